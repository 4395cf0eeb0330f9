# Shared by ./play and ./test (sourced): installs what the web build needs and builds the page's
# wasm into www/pkg/. Safe to run again: it installs only what is missing and cargo rebuilds only
# what changed.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dcl-target}"
# The native build carries the cuda and mpi features everywhere (tests, ./play): both are then
# proven by every build, and one set of features means Burn is compiled once. CUDA itself is
# loaded only at run time, so this builds on machines without a GPU or toolkit; MPI needs
# `native_deps`.
NATIVE_FEATURES="--features cuda,mpi"

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]}"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# What the native build needs besides Rust: OpenMPI (the mpi feature links it; mpirun runs the
# tests' ranks) and libclang (rsmpi's bindgen reads mpi.h with it).
native_deps() {
  apt_install libopenmpi-dev openmpi-bin libclang-dev
}

# wasm-bindgen-cli must be the exact version of the wasm-bindgen crate in Cargo.lock.
wasm_bindgen_version() {
  awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock
}

ensure_wasm_tools() {
  rustup target list --installed | grep -q '^wasm32-unknown-unknown$' \
    || rustup target add wasm32-unknown-unknown
  local want; want="$(wasm_bindgen_version)"
  if ! wasm-bindgen --version 2>/dev/null | grep -q " $want\$"; then
    echo "installing wasm-bindgen-cli $want (about 10 minutes, once)"
    # Not --locked: its lock file pins a crate version the registry here does not serve.
    env -u CARGO_TARGET_DIR cargo install wasm-bindgen-cli --version "$want"
  fi
}

# One wasm32 module of the crate with cargo features $1, bound for the web into $2 (dcl.js +
# dcl_bg.wasm), the crate itself (not its dependencies) compiled with rustc flags $3 if given.
# Built with Cargo.toml's `wasm-lean` profile (size-optimized but for the CPU path's hot crates;
# chosen by measurement, README "Its size") and without the name section (1.2 MB of the
# playground module's 4.0 MB gzipped): panics still print their message and location; stack
# traces show wasm-function[N] instead of Rust names.
wasm_module() {
  cargo rustc --profile wasm-lean --lib --crate-type cdylib --target wasm32-unknown-unknown \
    --no-default-features --features "$1" -- ${3:-}
  wasm-bindgen --target web --no-typescript --remove-name-section --out-dir "$2" \
    "$CARGO_TARGET_DIR/wasm32-unknown-unknown/wasm-lean/dcl.wasm"
}

# The playground's module (Burn on WebGPU plus every binding, www/pkg/), the same with relaxed
# SIMD's fused multiply-add in the CPU path's matrix products (www/pkg-relaxed/: the worker
# loads it where the browser has relaxed SIMD; a module with it does not compile elsewhere), and
# the embeds' small one (the WGSL engine and loss kernel without Burn, www/pkg-infer/, always
# size-optimized: it takes seconds).
build_wasm() {
  ensure_wasm_tools
  wasm_module webgpu www/pkg
  wasm_module relaxed-simd www/pkg-relaxed "-C target-feature=+relaxed-simd"
  wasm_module web-infer www/pkg-infer
  shrink_wasm www/pkg-infer/dcl_bg.wasm
}

# Size pass with npm's binaryen, pinned in package.json (Debian's wasm-opt 108 writes modules
# Chromium rejects); $2 enables more features (--enable-relaxed-simd for www/pkg-relaxed).
shrink_wasm() {
  [ -x node_modules/.bin/wasm-opt ] || npm install --no-audit --no-fund >/dev/null
  node_modules/.bin/wasm-opt -Oz --enable-bulk-memory --enable-reference-types --enable-multivalue \
    --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals --enable-simd \
    ${2:-} "$1" -o "$1"
}

wasm_size() {
  local f
  for f in www/pkg/dcl_bg.wasm www/pkg-relaxed/dcl_bg.wasm www/pkg-infer/dcl_bg.wasm; do
    echo "$f: $(stat -c %s "$f") bytes, $(gzip -9 -c "$f" | wc -c) gzipped"
  done
}
