#!/bin/sh
# segue's one entry point on Debian 12: installs the packages that are
# missing, configures and builds with CMake, then runs segue or the tests.
#
#   ./build.sh run [ARGS...]    install, build, run `segue run ARGS...` (no ARGS: the embedded default)
#   ./build.sh test             install, build, run every test through ctest
#   ./build.sh build | deps     only build; only install packages (deps: the tests' too)
#
# SEGUE_BUILD_TYPE=Sanitize ./build.sh test   builds with ASan+UBSan and runs the same tests.
set -eu
cd "$(dirname "$0")"

# One package per line or group, by what needs it (merges stay clean).
# PACKAGES build and run segue; TEST_PACKAGES are what the tests start or
# drive (servers, a browser, packaging tools), installed only for `test`.
PACKAGES="
  gcc libc6-dev make cmake pkg-config python3 curl ca-certificates
  liblua5.4-dev
  libuv1-dev libcjson-dev libsodium-dev
  libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  libcurl4-openssl-dev libhttp-parser-dev libsqlite3-dev
  libssl-dev openssl
  libexpat1-dev
  libpq-dev
"
TEST_PACKAGES="
  lua5.4 lua-busted
  ngircd
  inspircd
  prosody python3-slixmpp
  valgrind
  postgresql
  prometheus
  chromium chromium-driver python3-selenium
  dpkg-dev debhelper lintian adduser
  mandoc
  systemd
"

BUILD_TYPE=${SEGUE_BUILD_TYPE:-RelWithDebInfo}
BUILD_DIR=${SEGUE_BUILD_DIR:-build/$BUILD_TYPE}
JOBS=$(nproc 2>/dev/null || echo 2)

deps() {
  missing=""
  for p in $PACKAGES ${WITH_TEST_PACKAGES:+$TEST_PACKAGES}; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  echo "build.sh: installing:$missing" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

build() {
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" >/dev/null
  cmake --build "$BUILD_DIR" -j "$JOBS"
}

run_tests() {
  log="$BUILD_DIR/ctest.log"
  set +e
  (cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS" "$@") 2>&1 | tee "$log"
  status=$?
  set -e
  # ctest's own summary is "100% tests passed, 0 tests failed out of N";
  # close with the plain counts.
  summary=$(grep -a -E "tests passed, [0-9]+ tests? failed out of [0-9]+" "$log" | tail -n 1)
  if [ -z "$summary" ]; then
    echo "build.sh: ctest did not report a summary" >&2
    exit 1
  fi
  failed=$(echo "$summary" | sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/')
  total=$(echo "$summary" | sed -E 's/.* failed out of ([0-9]+).*/\1/')
  echo "$((total - failed)) tests passed, $failed tests failed"
  [ "$failed" -eq 0 ] && [ "$status" -eq 0 ]
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
case "$cmd" in
  deps) WITH_TEST_PACKAGES=1; deps ;;
  build) deps; build ;;
  run) deps; build; exec "$BUILD_DIR/segue" run "$@" ;;
  test) WITH_TEST_PACKAGES=1; deps; build; run_tests "$@" ;;
  *) echo "usage: ./build.sh run|test|build|deps" >&2; exit 2 ;;
esac
