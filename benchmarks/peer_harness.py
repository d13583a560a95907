"""Where the shared peer harness (``bench_peers.py``: HF+PEFT and torchtune on the same shapes) lives."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peer_harness_dir() -> Path:
    """$PEER_HARNESS_DIR, else ``shared/bench`` inside, beside or above the repository."""
    candidates = [os.environ.get("PEER_HARNESS_DIR", ""), REPO / "shared" / "bench",
                  REPO.parent / "shared" / "bench", REPO.parent.parent / "shared" / "bench"]
    return next((Path(c) for c in candidates if c and (Path(c) / "bench_peers.py").is_file()), Path(candidates[1]))
