"""Parses FHIR R4 Bundles with SMART on FHIR's python `fhirclient` models, strictly.

Usage: strict_parse.py BUNDLE.json...

Each entry's resource is parsed on its own, so that a failure names the entry. Strict
parsing refuses what the R4 models do not define (a superfluous key, a wrong type, a missing
required element), so a Bundle that passes is one an R4 client reads without loss.
Exit 0 when every resource parses; 1, naming each failure, when one does not.
"""

import json
import sys

from fhirclient.models import bundle
from fhirclient.models.fhirelementfactory import FHIRElementFactory


def check(path):
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    failures = []
    entries = data.get("entry", [])
    for index, entry in enumerate(entries):
        if "resource" not in entry and data.get("type") == "history":
            # An id-only notification names what changed (fullUrl, request) without it;
            # the strict parse of the Bundle below still checks the entry.
            continue
        resource = entry.get("resource", {})
        kind = resource.get("resourceType", "?")
        name = f"{path}: entry {index} ({kind}/{resource.get('id', '?')})"
        try:
            parsed = FHIRElementFactory.instantiate(kind, resource)
        except Exception as error:  # the models raise FHIRValidationError and others
            failures.append(f"{name}: {error}")
            continue
        if type(parsed).__name__ != kind:
            failures.append(f"{name}: not an R4 resource type")
    # The Bundle around them, strictly too.
    try:
        bundle.Bundle(data, strict=True)
    except Exception as error:
        failures.append(f"{path}: the Bundle: {error}")
    return len(entries), failures


def main(paths):
    total = 0
    failures = []
    for path in paths:
        count, failed = check(path)
        total += count
        failures.extend(failed)
    for failure in failures:
        print(failure)
    print(f"{len(paths)} bundles, {total} resources, {len(failures)} failed to parse strictly")
    return 1 if failures or not paths else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
