"""``lpips-pipe-export-weights DEST``: write a self-contained weights file for ``--weights``.

Resolves the backbone exactly as a job would (offline sources first, SPEC 4),
writes the full LPIPS state dict with its sha256 to DEST (local or any Beam
filesystem, e.g. gs://bucket/lpips-alex.pt) and prints the sha256. Workers that
load it check the digest, so a file corrupted in staging is refused. A missing or
refused source, or a destination that cannot be written, exits 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lpips_pipe.transforms import paths
from lpips_pipe.transforms.model.config import NETS, ModelConfig
from lpips_pipe.transforms.model.weights import WeightsUnavailable, export_weights


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lpips-pipe-export-weights", description=__doc__.split("\n")[0])
    parser.add_argument("destination", help="File or URI to write, e.g. lpips-alex.pt or gs://bucket/lpips-alex.pt")
    parser.add_argument("--net", choices=NETS, default="alex")
    parser.add_argument("--allow_download", action="store_true", help="Allow a torchvision download as last resort.")
    args = parser.parse_args(argv)
    paths.configure()  # object stores: credentials and endpoints from the environment
    try:
        digest = export_weights(ModelConfig(net=args.net, allow_download=args.allow_download), args.destination)
    except (WeightsUnavailable, ValueError, OSError) as error:
        # no source, a refused source (unsafe, truncated, wrong shape: ValueError), an unwritable destination
        text = paths.describe_error(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        print(f"lpips-pipe-export-weights: error: {reason}", file=sys.stderr)
        return 2
    print(f"wrote {args.destination}: LPIPS {args.net} v0.1, weights_sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
