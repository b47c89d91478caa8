# Sourced by the scripts run on the lent GPU machine (gpu_check.sh, density_gpu.sh), from the repository
# root: pyro-ppl from the wheels carried in .whl/, Fashion-MNIST from .data/ where Debian's package is
# missing (*.gz, or *.xz where gzip is too big to travel), and PY, the Python to run (default python3).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -d .data/fashion-mnist ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp .data/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
  for f in .data/fashion-mnist/*.xz; do  # xz where gzip would not fit what travels; python's lzma: no xz needed
    [ -f "$f" ] && python3 -c "import gzip, lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), \
gzip.open(sys.argv[2], 'wb', compresslevel=1))" "$f" "/usr/share/datasets/fashion-mnist/$(basename "$f" .xz).gz"
  done
fi
PY=${PY:-python3}
