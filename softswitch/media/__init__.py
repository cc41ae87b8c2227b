"""The media plane (ARCHITECTURE.md): PJSUA2 worker processes and the pool that runs them.

- ``protocol``: the control protocol between the controller and its workers (commands, events, replies;
  newline-delimited JSON), a sans-IO codec;
- ``worker``: the worker process, the only module that imports ``pjsua2``;
- ``pool``: the controller side (asyncio): spawns, supervises and talks to the workers.

Importing this package imports neither ``worker`` nor ``pjsua2``.
"""
