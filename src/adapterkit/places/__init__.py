"""Places: where an adapter meets the frozen model, and the runtimes that run it there.

* ``slots``: ``Site`` (one place at one host) and the ``Slot`` runtimes of the ``pre``,
  ``post``, ``parallel`` and ``weight`` places (hooks that exist only while a plan needs them);
* ``attention``: the ``attention`` place, key / value prefixes inside attention (prefix tuning);
* ``input``: the ``input`` place, rows prepended to the input sequence (prompt tuning);
* ``input_hosts``: the host table of the ``input`` place, per architecture.
"""
