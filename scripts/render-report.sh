#!/usr/bin/env bash
# Render a conformance report.html to a PNG in a headless browser, as a person would see it.
#   scripts/render-report.sh reports/conformance/report.html [out.png]
# Needs chromium (Debian: apt-get install chromium) or google-chrome on PATH.
set -euo pipefail
html=${1:?usage: render-report.sh REPORT_HTML [OUT_PNG]}
png=${2:-${html%.html}.png}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "render-report.sh: no chromium/google-chrome on PATH (apt-get install chromium)" >&2
  exit 3
fi
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,1400 \
  --screenshot="$(realpath -m "$png")" "file://$(realpath "$html")" >/dev/null 2>&1
test -s "$png"
echo "$png"
