"""The task engine: background processes and their records.

``registry`` owns every task (launch, wait, cancel, output, limits; the only writer of records),
whose body is a process or a ``Job`` (a coroutine of the server: a queue run); ``executor`` starts
and stops process groups (``Executor`` is the interface, ``LocalExecutor`` the real one, ``fake``
the ``FakeExecutor`` for tests); ``processes`` reads and signals them through ``/proc``; ``watchdog`` is the subprocess
that kills a dead server's tasks; ``logs`` writes and pages output; ``records`` persists task
records; ``admission`` holds a start while memory or load is short.
"""
