"""What a run prints (rlhf/console.py): the data layer's INFO lines reach run.log, not the console."""
from __future__ import annotations

import io
import logging

from rlhf.console import quiet_libraries


def test_data_info_lines_go_to_the_log_file_only(tmp_path):
    root = logging.getLogger()
    console, logfile = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "run.log")
    old_level = root.level
    root.addHandler(console)
    root.addHandler(logfile)
    root.setLevel(logging.INFO)
    try:
        quiet_libraries("cpu")
        quiet_libraries("cpu")  # twice (rank worker after run.py): one filter
        logging.getLogger("rlhf.data.blend").info("step 1: source demo keeps 80 rows")
        logging.getLogger("rlhf.data.sources").warning("source x: 3 bad rows")
        logging.getLogger("rlhf.stages.common").info("stage sft done in 3 s")
        logfile.flush()
    finally:
        root.removeHandler(console)
        root.removeHandler(logfile)
        logfile.close()
        root.setLevel(old_level)
    assert console.stream.getvalue().splitlines() == ["source x: 3 bad rows", "stage sft done in 3 s"]
    assert (tmp_path / "run.log").read_text().splitlines() == [
        "step 1: source demo keeps 80 rows", "source x: 3 bad rows", "stage sft done in 3 s"]
    assert len(console.filters) == 1
