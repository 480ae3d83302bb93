"""The README's configuration table is the one the code renders: it cannot drift."""

import os
import re

from lmcache_core.config import keys_markdown

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_readme_config_table_matches_the_code():
    text = open(README).read()
    m = re.search(r"<!-- config-keys:.*?-->\n(.*?)\n<!-- /config-keys -->", text, re.S)
    assert m, "README lacks the config-keys block"
    assert m.group(1).strip() == keys_markdown().strip(), "run keys_markdown() and paste it into the README"
