#!/usr/bin/env python3
"""Checks that every relative link resolves, and every #anchor names a heading.

    check-links.py html DIR          the built book: href/src in every page
    check-links.py markdown FILE...  markdown as a repository browser shows it

Links to other sites are not followed (CI has no network to them). Prints
each broken link as FILE: LINK (why) and exits 1 when there is one.
"""

import html.parser
import os
import re
import sys
import urllib.parse

EXTERNAL = ("http:", "https:", "mailto:", "javascript:", "data:", "ftp:")


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif name in ("href", "src"):
                self.links.append(value)


def parse_html(path, cache={}):
    if path not in cache:
        page = Page()
        with open(path, encoding="utf-8") as f:
            page.feed(f.read())
        cache[path] = page
    return cache[path]


def check_html(root):
    broken = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".html"):
                continue
            path = os.path.join(folder, name)
            for link in parse_html(path).links:
                why = resolve(path, link, html_ids)
                if why:
                    broken.append(f"{os.path.relpath(path, root)}: {link} ({why})")
    return broken


def html_ids(path):
    return parse_html(path).ids if path.endswith(".html") else None


def slug(heading):
    """A heading's anchor, as GitHub and mdBook make it."""
    text = re.sub(r"`|\*", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_ids(path, cache={}):
    if not path.endswith(".md"):
        return None
    if path not in cache:
        ids, seen, fenced = set(), {}, False
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("```"):
                    fenced = not fenced
                    continue
                match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
                if match:
                    base = slug(match.group(1))
                    count = seen.get(base, 0)
                    seen[base] = count + 1
                    ids.add(base if count == 0 else f"{base}-{count}")
                ids.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', line))
        cache[path] = ids
    return cache[path]


def markdown_links(path):
    links, fenced = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                continue
            line = re.sub(r"`[^`]*`", "", line)
            links += re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)
            links += re.findall(r'(?:href|src)="([^"]+)"', line)
    return links


def resolve(source, link, ids_of):
    if link.startswith(EXTERNAL) or link.startswith("//"):
        return None
    parts = urllib.parse.urlsplit(link)
    if parts.scheme:
        return None
    target = source
    if parts.path:
        target = os.path.normpath(
            os.path.join(os.path.dirname(source), urllib.parse.unquote(parts.path))
        )
        if os.path.isdir(target):
            index = os.path.join(target, "index.html")
            target = index if os.path.exists(index) else target
        if not os.path.exists(target):
            return "no such file"
    if parts.fragment:
        ids = ids_of(target)
        if ids is not None and urllib.parse.unquote(parts.fragment) not in ids:
            return "no such anchor"
    return None


def check_markdown(files):
    broken = []
    for path in files:
        for link in markdown_links(path):
            why = resolve(path, link, markdown_ids)
            if why:
                broken.append(f"{path}: {link} ({why})")
    return broken


def main(argv):
    if len(argv) >= 3 and argv[1] == "html":
        broken = check_html(argv[2])
    elif len(argv) >= 3 and argv[1] == "markdown":
        broken = check_markdown(argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for line in broken:
        print(line)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
