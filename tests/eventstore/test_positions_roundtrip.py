"""
Regression: feed positions come back from the log as they were stored, type included.

``positions()`` used to turn a stored value back into an int when
``v.lstrip("-").isdigit()``: an MQTT mark (a str) made of digits came back as an int
without its leading zeros, and a str that passes that test but is no int literal
(``"--5"``, ``"²"``) made ``positions()`` raise ``ValueError`` for every feed, so a
consumer could not resume at all. Fixed in e482c0e.
"""

from __future__ import annotations

import pytest

from eventstore import EventLog

POSITIONS = [0, 42, 10**12, "mqtt-mark-17", "0042", "--5", "\N{SUPERSCRIPT TWO}", "-3"]


@pytest.mark.parametrize("position", POSITIONS)
def test_a_position_is_read_back_equal_and_of_the_same_type(tmp_path, position):
    """An int offset or a str mark, numeric-looking or not, is read back as stored."""
    log = EventLog(tmp_path / "events.db")
    log.append([], positions={("feed", "0"): position, ("kafka:events", "0"): 7})

    found = log.positions()
    log.close()

    assert ({("feed", "0"): position, ("kafka:events", "0"): 7}, type(position)) == (
        found, type(found[("feed", "0")]))


def test_positions_survive_reopening(tmp_path):
    """The types are kept in the file, not only in memory."""
    log = EventLog(tmp_path / "events.db")
    log.append([], positions={("mqtt:events", "0"): "0042", ("kafka:events", "0"): 42})
    log.close()

    log = EventLog(tmp_path / "events.db")
    found = log.positions()
    log.close()

    assert {("mqtt:events", "0"): "0042", ("kafka:events", "0"): 42} == found
