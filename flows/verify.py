"""`lvd verify [STAGE]`: every committed part of the store checked against its recorded size and sha256.

    <store>/<stage>/<key>/_STAGE.json --record_problems(full=True)--> ok | what is wrong, one line each
      (a part missing, added, resized or changed; a record of an older format or unreadable)

A run reuses a stage only when its parts' names and sizes still match the record (cheap, every time);
this command also hashes every part. Damage makes the command exit with status 1; the next run
recomputes what the record no longer vouches for (delete a part whose content changed at the same size
first, so that the cheap check sees it too).
"""

from __future__ import annotations

from rich.console import Console

from pipelines.record import record_problems
from pipelines.store import Store

DAMAGED_EXIT = 1


def verify(store: Store, stage: str | None, console: Console) -> int:
    """Checks every committed run of `stage` (every stage for None); 0 when all hold, else 1."""
    stages = [stage] if stage else store.list_stages()
    checked = damaged = 0
    for name in stages:
        for key in store.list_stage_keys(name):
            if not store.exists(store.record_path(name, key)):
                continue  # never committed (or being computed): nothing is claimed about it
            checked += 1
            _, problems = record_problems(store, name, key, None, full=True)
            if problems:
                damaged += 1
                for problem in problems:
                    console.print(f"DAMAGED {name}/{key}: {problem}", soft_wrap=True, highlight=False)
            else:
                console.print(f"ok      {name}/{key}", highlight=False)
    console.print(f"{checked} committed stage runs checked, {damaged} damaged", highlight=False)
    return DAMAGED_EXIT if damaged else 0
