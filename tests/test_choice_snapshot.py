"""The kernel choice for every problem of a grid on five device profiles equals the recorded one
(tests/choice_grid.py says how the snapshot is made and when it may be re-recorded)."""

from __future__ import annotations

import gzip
import json

from choice_grid import SNAPSHOT, choices


def test_choice_equals_snapshot() -> None:
    want = json.loads(gzip.decompress(SNAPSHOT.read_bytes()))
    got = choices()
    assert got.keys() == want.keys()
    changed = [f"{profile} {key}:\n  was {want[profile].get(key)}\n  now {rows[key]}"
               for profile, rows in got.items() for key in rows if rows[key] != want[profile].get(key)]
    missing = [f"{profile} {key}" for profile, rows in want.items() for key in rows if key not in got[profile]]
    assert not changed and not missing, (f"{len(changed)} choices changed, {len(missing)} problems gone; first: "
                                         + "\n".join((changed + missing)[:5]))
