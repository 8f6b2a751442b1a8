#!/usr/bin/env bash
# Rebuilds .dvc/plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed
# inlined, so `dvc plots show` / `dvc plots diff` pages render with no network.
#
# The versions are the ones dvc-render (1.0.x, dvc 3) loads from its CDN in VegaRenderer.SCRIPTS,
# so the Vega-Lite specs DVC writes are read by the library they were written for. The builds
# are the minified UMD files of the npm packages; each tarball is checked against its sha256.
# Needs npm (the registry) and sha256sum. Usage: bash .dvc/plots/build_offline_template.sh
set -euo pipefail

VEGA=5.20.2
VEGA_LITE=5.2.0
VEGA_EMBED=6.18.2
declare -A SHA256=(
  [vega-$VEGA.tgz]=d77deab01d6104b1239228720721f93003e60797d2faced7ffdd759fa70f989d
  [vega-lite-$VEGA_LITE.tgz]=f64ca4745f043447ac86b67dc9e9592ec2b85ac8b8dafc35faf970f142463e4b
  [vega-embed-$VEGA_EMBED.tgz]=93aeee312e92077b0252ef026c0fe0ec8fa430c19825aeada6cd3a6804e68e1b
)
OUT="$(cd "$(dirname "$0")" && pwd)/offline.html"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$TMP"
npm pack --silent "vega@$VEGA" "vega-lite@$VEGA_LITE" "vega-embed@$VEGA_EMBED" >/dev/null
for tgz in "${!SHA256[@]}"; do
  echo "${SHA256[$tgz]}  $tgz" | sha256sum --check --quiet
  mkdir "${tgz%.tgz}" && tar xzf "$tgz" -C "${tgz%.tgz}"
done

# name@version  path of the minified build inside the unpacked tarball
LIBS=(
  "vega@$VEGA vega-$VEGA/package/build/vega.min.js"
  "vega-lite@$VEGA_LITE vega-lite-$VEGA_LITE/package/build/vega-lite.min.js"
  "vega-embed@$VEGA_EMBED vega-embed-$VEGA_EMBED/package/build/vega-embed.min.js"
)
for lib in "${LIBS[@]}"; do
  js=${lib#* }
  # Inlined code must not close the script element early, nor hold a placeholder that
  # dvc-render replaces ({plot_divs}, {scripts}, {refresh_tag}).
  if grep -qiE '</script|<!--|\{(plot_divs|scripts|refresh_tag)\}' "$js"; then
    echo "build_offline_template.sh: $js holds '</script', '<!--' or a dvc-render placeholder" >&2
    exit 1
  fi
done

{
  cat <<HTML
<!DOCTYPE html>
<!--
  DVC plots page template that works offline (dvc plots show / dvc plots diff).
  Used through .dvc/config: [plots] html_template = plots/offline.html

  dvc-render's default page takes its script tags from its scripts placeholder, which loads
  vega, vega-lite and vega-embed from a CDN; this page has no such placeholder (so those tags
  are dropped) and inlines the three libraries instead, at the versions dvc-render pins:
    vega@$VEGA, vega-lite@$VEGA_LITE, vega-embed@$VEGA_EMBED
  (npm tarballs, files build/*.min.js; tarball sha256 in the build script).
  Built by .dvc/plots/build_offline_template.sh: edit that script, not this file.
  The plot_divs placeholder in the body is where dvc-render puts the plots.

  The three libraries are distributed under the BSD 3-Clause license:
HTML
  for lib in "${LIBS[@]}"; do
    dir=${lib#* }; dir=${dir%%/*}
    echo
    echo "  ${lib%% *}:"
    sed 's/^/    /; s/[[:space:]]*$//' "$dir/package/LICENSE"
  done
  cat <<'HTML'
-->
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
HTML
  for lib in "${LIBS[@]}"; do
    printf '    <script>/* %s %s */\n' "${lib%% *}" "${lib#*/package/}"
    # the source maps are not shipped: drop the comment that would make devtools ask for them
    sed '/^\/\/# sourceMappingURL=/d' "${lib#* }"
    printf '\n    </script>\n'
  done
  cat <<'HTML'
    <style>
        table {
            border-spacing: 15px;
        }
        /* dvc-render puts each image plot's revisions on one line (white-space: nowrap) and
           hides what overflows: a wide figure was cut off at the right. Let the revisions wrap,
           and scale each image down to the page's width. */
        div[style*="nowrap"] {
            white-space: normal !important;
        }
        div[style*="nowrap"] > div {
            max-width: calc(100% - 16px);
        }
        div[style*="nowrap"] img {
            max-width: 100%;
            height: auto;
        }
        /* dvc-render puts every vega plot before every image, and the images in name order:
           test_mse.png, the headline (every model, best first), came 7th of 8. The page is a
           column whose items keep that order but these: the headline first, then the overlay
           of every model's test-MSE curve. */
        body {
            display: flex;
            flex-direction: column;
        }
        #plots_figures_test_mse_png {
            order: -2;
        }
        #test_mse_by_epoch {
            order: -1;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
HTML
} > "$OUT"
echo "wrote $OUT ($(wc -c < "$OUT") bytes)"
