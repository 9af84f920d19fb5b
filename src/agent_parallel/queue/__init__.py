"""The work queue: the items in ``.agent/queue/`` and everything done with them.

``names`` is the grammar of item file names and ids; ``items`` parses item files and reads a queue
directory (``QueueReader``); ``claims`` is the one
place that renames an item file (its status); ``conflicts`` finds items that must not run
together; ``planner`` builds the graph, ranks ready items and predicts a schedule (pure, no I/O);
``plan`` plans a workspace (config + reader + planner); ``run`` carries items out through the
task registry (``launch_item``, ``QueueRun``: the ``Job`` of a run task). Nothing here knows about MCP or the terminal.
"""
