#!/bin/sh
# Installs what the browser tier of the tests needs (tests/browser): Debian's
# Chromium at /usr/bin/chromium and the `playwright` Python package in the venv.
# Playwright never downloads a browser of its own here; the tests drive Debian's.
# Idempotent, and never fails the build: when something cannot be installed it
# prints one line saying why and exits 0 (the browser tests then skip, saying so).
#
# usage: scripts/install_browser.sh [VENV]     (default: .venv)
VENV="${1:-.venv}"
PY="$VENV/bin/python"

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install_browser: /usr/bin/chromium missing and not root; run 'apt-get install chromium' as root to enable the browser tests"
    elif ! command -v apt-get >/dev/null 2>&1; then
        echo "install_browser: /usr/bin/chromium missing and no apt-get here; install Chromium to enable the browser tests"
    elif ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; then
        echo "install_browser: 'apt-get install chromium' failed; the browser tests will be skipped"
    fi
fi

if [ ! -x "$PY" ]; then
    echo "install_browser: no venv at $VENV; the browser tests will be skipped"
elif ! "$PY" -c "import playwright" >/dev/null 2>&1; then
    if ! PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PY" -m pip install -q playwright >/dev/null 2>&1; then
        echo "install_browser: 'pip install playwright' failed; the browser tests will be skipped"
    fi
fi
exit 0
