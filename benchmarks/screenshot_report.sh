#!/usr/bin/env bash
# Render a report.html headless with Chromium and save a PNG screenshot, to check the page's layout.
#
#   benchmarks/screenshot_report.sh REPORT_HTML OUT_PNG [WIDTHxHEIGHT]
#
# The report is self-contained (inline CSS, base64 figures), so nothing is fetched; networking features of
# Chromium are switched off anyway. Needs `chromium` (Debian: apt-get install chromium); CHROMIUM=... picks
# another binary. Default window 1280x2400 (the whole page of a small report).
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT_HTML OUT_PNG [WIDTHxHEIGHT]" >&2
    exit 2
fi
html=$1
out=$2
size=${3:-1280x2400}
if [[ ! $size =~ ^[0-9]+x[0-9]+$ ]]; then
    echo "error: size must be WIDTHxHEIGHT, e.g. 1280x2400 (got '$size')" >&2
    exit 2
fi
if [[ ! -f $html ]]; then
    echo "error: $html: no such file" >&2
    exit 2
fi

browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then
            browser=$candidate
            break
        fi
    done
fi
if [[ -z $browser ]]; then
    echo "error: no chromium found (Debian: apt-get install chromium; or set CHROMIUM=/path/to/chrome)" >&2
    exit 2
fi

abs_html=$(realpath "$html")
mkdir -p "$(dirname "$out")"
abs_out=$(realpath "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$abs_out" --window-size="${size/x/,}" "file://$abs_html" >/dev/null 2>"$profile/stderr.log" || {
    echo "error: $browser failed:" >&2
    tail -20 "$profile/stderr.log" >&2
    exit 1
}
if [[ ! -s $abs_out ]]; then
    echo "error: $browser wrote no screenshot (see its log below)" >&2
    tail -20 "$profile/stderr.log" >&2
    exit 1
fi
echo "$abs_out"
