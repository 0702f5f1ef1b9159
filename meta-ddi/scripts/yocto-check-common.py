#!/usr/bin/env python3
"""yocto-check-layer's common tests that need no world build, run on a layer already in
the build's BBLAYERS.

Usage (in an OE build environment, oe-init-build-env sourced):
  yocto-check-common.py OE_CORE_SCRIPTS_DIR LAYER_DIR

yocto-check-layer itself first takes world signatures without the layer and runs three
more world signature builds (test_world, test_world_inherit_class, test_signatures); on
the project's 2-core CI machine that is several minutes. This runs the other tests of its
CommonCheckLayer class, the tool's own test code, unchanged: test_readme, test_security,
test_patches_upstream_status, test_layerseries_compat, test_parse (bitbake -p) and
test_show_environment (bitbake -e). Exit 1 if one fails or is skipped.
"""

import logging
import os
import sys

TESTS = ("test_readme", "test_security", "test_patches_upstream_status", "test_layerseries_compat",
         "test_parse", "test_show_environment")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    scripts, layer_dir = (os.path.abspath(a) for a in sys.argv[1:])
    sys.path[:0] = [scripts, os.path.join(scripts, "lib")]
    # The tool's own setup (scripts/yocto-check-layer): OE's and BitBake's libraries.
    import scriptpath
    scriptpath.add_oe_lib_path()
    scriptpath.add_bitbake_lib_path()
    from checklayer import detect_layers
    from checklayer.context import CheckLayerTestContext

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logger = logging.getLogger("yocto-check-layer")
    layers = detect_layers([layer_dir], True)
    if len(layers) != 1:
        sys.exit("%s: %d layers detected, expected 1" % (layer_dir, len(layers)))
    layer = layers[0]
    print("layer %s (%s), collections %s" % (layer["name"], layer["type"], ", ".join(layer["collections"])))
    # test_readme skips its maintainer, patch and address checks when the file mentions
    # another README (the word, in any case): it must not, so that the test really checks.
    import glob
    import re
    readme = sorted(glob.glob(os.path.join(layer_dir, "[Rr][Ee][Aa][Dd][Mm][Ee]*")))
    if readme and re.search("README", open(readme[0]).read(), re.IGNORECASE):
        print("FAIL %s mentions README: test_readme would skip its maintainer, patch and address checks"
              % os.path.basename(readme[0]))
        return 1
    td = {"bbvars": {}, "builddir": os.environ["BUILDDIR"], "sigs": {}, "machines": None}
    context = CheckLayerTestContext(td=td, logger=logger, layer=layer, test_software_layer_signatures=False)
    context.loadTests([os.path.join(scripts, "lib", "checklayer", "cases")], modules=["common"],
                      tests=["common.CommonCheckLayer.%s" % test for test in TESTS])
    result = context.runTests()
    ran = result.testsRun - len(result.skipped)
    print("%d of %d tests run and passed" % (ran - len(result.failures) - len(result.errors), len(TESTS)))
    return 0 if result.wasSuccessful() and ran == len(TESTS) else 1


if __name__ == "__main__":
    sys.exit(main())
