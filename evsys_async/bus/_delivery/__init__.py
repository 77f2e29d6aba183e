"""Deliveries: how one subscriber's handler gets its events, in a task, a thread or a
child process (``base.py`` has the interface; docs/design.md, "How an event travels"
and "The process delivery and its wire")."""
