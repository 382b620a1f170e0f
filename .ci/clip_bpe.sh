# Sourced by .ci/run and .ci/newest with the work folder as $1: CLIP's original BPE merge list, so the
# suite can re-derive the shipped tokenizer files from it (skipped, saying why, where it cannot be fetched).
if pip download -q --no-deps --only-binary=:all: open-clip-torch==3.3.0 -d "$1/wheel" >/dev/null 2>&1; then
  python3 - "$1" <<'PY'
import glob, sys, zipfile
work = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{work}/wheel/*.whl")[0]) as z:
    open(f"{work}/bpe_simple_vocab_16e6.txt.gz", "wb").write(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
PY
  export LATENTDIFF_CLIP_BPE="$1/bpe_simple_vocab_16e6.txt.gz"
else
  echo "note: could not fetch open-clip-torch; the tokenizer derivation test will be skipped"
fi
