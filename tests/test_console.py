"""A command's log handlers live as long as the command: after it, in-process callers (tests, scripts)
find rwcflow's logger as it was, and its log file closed."""

from __future__ import annotations

import logging

from rwcflow.bids_app.cli import main
from rwcflow.console import command_logging

LOGGER = logging.getLogger("rwcflow")


def test_handlers_added_in_the_block_are_closed_and_the_logger_restored(tmp_path, capsys):
    before = LOGGER.handlers[:], LOGGER.level, LOGGER.propagate
    with command_logging(logging.INFO, logging.Formatter("x: %(message)s")) as log:
        file_handler = logging.FileHandler(tmp_path / "run.log")
        log.addHandler(file_handler)
        log.info("during")
    assert (LOGGER.handlers[:], LOGGER.level, LOGGER.propagate) == before
    assert file_handler.stream is None  # closed
    assert "x: during" in capsys.readouterr().err and (tmp_path / "run.log").read_text() == "during\n"
    LOGGER.warning("after")  # nowhere of the block's
    assert "after" not in (tmp_path / "run.log").read_text()


def test_the_app_leaves_no_handler_behind(tmp_path):
    before = LOGGER.handlers[:]
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "participant"]) == 2
    assert LOGGER.handlers == before
