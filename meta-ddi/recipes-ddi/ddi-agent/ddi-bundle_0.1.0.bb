SUMMARY = "Create and verify signed ddi update bundles"
DESCRIPTION = "ddi-bundle signs an update image into a bundle (manifest, ed25519 \
               signature, image) that ddi-agent verifies before writing a byte to the slot. The \
               native variant is what the ddi_update_artifact class runs at image build time."
SECTION = "devel"

require ddi-workspace.inc

inherit cargo

CARGO_BUILD_FLAGS += "--package ddi-bundle"

BBCLASSEXTEND = "native"
