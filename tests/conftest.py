import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from raysegment import disable_telemetry  # noqa: E402

disable_telemetry()

SHARED_ACDC = Path(__file__).resolve().parents[1].parent / "shared" / "acdc"
