"""Where the shared peer harness (``bench_peers.py``: HF+PEFT and torchtune on the same shapes) lives."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peer_harness_dir() -> Path:
    """$PEER_HARNESS_DIR when set (benchmarks/gpu_wheels.sh copies the harness into .whl/peers, which
    travels to a GPU machine), else ``shared/bench`` inside, beside or above the repository."""
    if os.environ.get("PEER_HARNESS_DIR"):
        return Path(os.environ["PEER_HARNESS_DIR"])
    candidates = [REPO / "shared" / "bench", REPO.parent / "shared" / "bench", REPO.parent.parent / "shared" / "bench"]
    return next((c for c in candidates if (c / "bench_peers.py").is_file()), candidates[0])
