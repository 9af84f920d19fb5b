"""A cloned repository can ship any file under ``.agent/``: whatever its items and its config say,
reading and planning them answers, each problem as a diagnostic or a ``ConfigError`` with a bounded
message, never another exception.

Two generative tests over the pure core (hypothesis): ``parse_item`` on one file (a name valid or
nearly so; front matter built from the item's own keys with values of every YAML type, or raw
hostile text), and ``plan_workspace`` on a queue of up to a dozen such items whose references point
anywhere (themselves, each other in cycles, missing ids). The plan must list every item file once
(as an item or in its errors), keep its answer bounded and serializable, and change no file. A third
gives ``load_config`` a ``config.yaml`` of the real sections and keys with values of every type.
``FUZZ_EXAMPLES=N`` draws N new examples instead of the fixed ones.
"""

from __future__ import annotations

import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_parallel.config import _KNOWN, ConfigError, load_config
from agent_parallel.queue.items import QueueReader, parse_item
from agent_parallel.queue.plan import plan_workspace

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, derandomize="FUZZ_EXAMPLES" not in os.environ, deadline=None,
                suppress_health_check=list(HealthCheck))
KEYS = ["title", "status", "command", "blocked_by", "blocks", "files", "components", "priority", "estimate",
        "timeout", "isolation", "resources", "retries", "depends_on", "unknown_key", "", "0", "~"]
STATUSES = ["pending", "in_progress", "completed", "failed", "blocked", "done", "Pending", ""]
HOSTILE = ["", " ", "\t", "x" * 5000, "../../etc/passwd", "/", "*", "**/*", "a\\b", "é", "\u202e", "007", "#7",
           "-1", "1e400", "nan", "inf", "yes", "null", "~", "[", "{", ":", "- x", "!!python/object:os.system",
           "&a", "*a", "%TAG", "---", "...", "0x10", "1_000", "10m", "1h30m", "-5s", "99999999999999999999999"]

ids = st.integers(-3, 20)
scalars = st.one_of(st.none(), st.booleans(), ids, st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(HOSTILE), st.text(max_size=10))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner, max_size=3), max_leaves=8)
front_values = st.one_of(values, st.lists(ids, max_size=4), ids.map(str), ids.map(lambda i: f"{i:03d}"))
RAW = ["", "---\n", "---\n---\n", "---\nno end", "---\n: :\n---\n", "---\n- a\n- b\n---\n", "---\n[" * 3000,
       "---\nkey: [unclosed\n---\n", "---\na: &x 1\nb: *y\n---\n", "---\n\ttab: 1\n---\n", "\ufeff---\ntitle: x\n---\n",
       "---\n!!binary QUJD: 1\n---\n", "---\nblocked_by: !!set {1, 2}\n---\n", "---\ncommand: !!python/name:os.system\n---\n",
       "---\r\ntitle: crlf\r\n---\r\n# body\r\n"]


@st.composite
def item_text(draw: st.DrawFn) -> str:
    """An item file's text: YAML front matter of the item's keys with any values, or raw hostile text."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.one_of(st.sampled_from(RAW), st.text(max_size=200)))
    fields = draw(st.dictionaries(st.sampled_from(KEYS), front_values, max_size=6))
    try:
        front = yaml.safe_dump(fields, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        front = "title: x\n"
    return f"---\n{front}---\n# {draw(st.text(max_size=20))}\n{draw(st.text(max_size=40))}"


@st.composite
def file_name(draw: st.DrawFn, item_id: int | None = None) -> str:
    number = draw(st.integers(0, 12)) if item_id is None else item_id
    id_text = draw(st.sampled_from([f"{number:03d}", str(number), f"{number:041d}", "abc", ""])) \
        if item_id is None else f"{number:03d}"
    slug = draw(st.one_of(st.just("item"), st.from_regex(r"[a-z0-9-]{0,12}", fullmatch=True), st.sampled_from(HOSTILE[:12])))
    return f"{id_text}-{draw(st.sampled_from(STATUSES))}-{slug}.md".replace("/", "_").replace("\0", "_")


def bounded(message: str) -> bool:
    return bool(message.strip()) and len(message) <= 2000


@pytest.mark.fault("an item file of any shape (hostile names, YAML of any type in every key, raw text): "
                   "an item or diagnostics with bounded messages, never an exception")
@FUZZ
@given(name=file_name(), text=item_text())
def test_any_item_file_parses_to_an_item_or_clear_diagnostics(name: str, text: str) -> None:
    item, diagnostics = parse_item(name, text)
    assert item is not None or diagnostics, "an item refused without saying why"
    for diagnostic in diagnostics:
        assert bounded(diagnostic.message), diagnostic
        assert diagnostic.kind


@pytest.mark.fault("a queue of such items referring anywhere (self, cycles, missing ids): every file planned "
                   "or reported, the answer bounded, no file changed")
@FUZZ
@given(queue=st.dictionaries(st.integers(1, 12), st.tuples(file_name(), item_text(), st.lists(ids, max_size=3)),
                             min_size=1, max_size=12),
       max_parallel=st.integers(1, 8))
def test_any_queue_plans_every_file_with_bounded_answers(tmp_path_factory, queue, max_parallel: int) -> None:
    root = tmp_path_factory.mktemp("queue")
    folder = root / ".agent" / "queue"
    folder.mkdir(parents=True)
    for number, (name, text, refs) in queue.items():
        named = f"{number:03d}-{name.split('-', 2)[1] if name.count('-') >= 2 else 'pending'}-x.md"
        if refs and "blocked_by" not in text:  # most queues reference each other: cycles, self, missing ids
            text = text.replace("---\n", f"---\nblocked_by: {refs}\n", 1) if text.startswith("---\n") else text
        (folder / named).write_text(text, encoding="utf-8", errors="surrogatepass")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    plan = plan_workspace(root, None, max_parallel, QueueReader(watch=False))
    answer = plan.model_dump_json()
    assert len(answer) < 2_000_000
    listed = {item.file for item in plan.items} | {d.file for d in plan.errors if d.file}
    assert set(before) <= listed, f"files neither planned nor reported: {set(before) - listed}"
    for diagnostic in [*plan.errors, *plan.warnings]:
        assert bounded(diagnostic.message), diagnostic
    planned = {item.id for item in plan.items}
    assert {i for wave in plan.waves for i in wave} <= planned and set(plan.run_now) <= planned
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "planning changed a queue file"


@st.composite
def config_text(draw: st.DrawFn) -> str:
    """A config.yaml of the real sections and keys (some unknown ones too), any value in each."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.one_of(st.sampled_from(RAW), st.text(max_size=100)))
    data: dict[str, object] = {}
    for section in draw(st.lists(st.sampled_from([*_KNOWN[""], "l3", "unknown"]), unique=True, max_size=5)):
        keys = _KNOWN.get(section, ["x"]) + ["typo_key"]
        data[section] = draw(st.one_of(
            st.dictionaries(st.sampled_from(keys), st.one_of(front_values, st.sampled_from(HOSTILE)), max_size=5),
            values))
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return "queue: {dir: .agent/queue}\n"


@pytest.mark.fault("a config.yaml of the real keys with values of any type: a config or a ConfigError with a "
                   "bounded message, never another exception")
@FUZZ
@given(text=config_text())
def test_any_config_loads_or_says_what_is_wrong(tmp_path_factory, text: str) -> None:
    root = tmp_path_factory.mktemp("config")
    (root / ".agent").mkdir()
    (root / ".agent" / "config.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        _, warnings = load_config(root)
    except ConfigError as exc:
        assert bounded(str(exc)), str(exc)[:300]
        return
    assert all(bounded(w) for w in warnings), warnings
