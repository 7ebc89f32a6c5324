"""Writes the page template of `dvc plots show` (``.dvc/config``: ``plots.html_template``) with
Vega, Vega-Lite and Vega-Embed inlined, so that the plots page renders offline and in sandboxed
viewers; DVC's own page loads them from a CDN.

    python tools/plots_template.py OUT VEGA.tgz VEGA-LITE.tgz VEGA-EMBED.tgz   # npm pack's tarballs
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

# The template has no {scripts} placeholder: DVC's CDN script tags have nowhere to go.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def bundled_script(tarball: Path) -> str:
    """The package's minified browser build (package/build/<name>.min.js) as a <script> element."""
    name = tarball.name.rsplit("-", 1)[0]
    with tarfile.open(tarball) as archive:
        source = archive.extractfile(f"package/build/{name}.min.js").read().decode()
    source = source.replace("</script", "<\\/script")                 # the one text that would end the element
    return f"<script>/* {tarball.name.removesuffix('.tgz')} */\n{source}\n</script>"


def main(out: Path, *tarballs: Path) -> None:
    page = PAGE.replace("SCRIPTS", "\n".join(bundled_script(tarball) for tarball in tarballs))
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page)
    partial.replace(out)
    print(f"wrote {out} ({len(page) // 1024} KiB: {', '.join(t.name.removesuffix('.tgz') for t in tarballs)})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *map(Path, sys.argv[2:]))
