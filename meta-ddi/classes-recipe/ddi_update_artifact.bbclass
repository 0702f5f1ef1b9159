# Update artifacts from an image build (inherit it in the image recipe; the example
# ddi-image-minimal does):
#   <image>.rootfs.ext4.gz   the slot image, gzip-compressed (an ordinary image
#                            conversion): upload it to hawkBit as the "os" artifact;
#                            the agent detects gzip by its magic bytes.
#   <image>.ddibundle        the same image as a signed bundle (`ddi-bundle create`,
#                            built by ddi-bundle-native), when DDI_BUNDLE_KEYS names
#                            secret key files; the agent verifies it before writing.
#                            With DDI_BUNDLE_FORMAT = "3" (or "2") it is a chunked
#                            bundle made from the raw slot image: devices download only
#                            the chunks their running slot lacks (delta updates; agents
#                            from the release that reads that format on).
# Both are deployed to DEPLOY_DIR_IMAGE with the usual <IMAGE_LINK_NAME> symlinks.

# The filesystem type of a slot (the same as the wks slot partitions).
DDI_ARTIFACT_FSTYPE ??= "ext4"
# Secret ed25519 key file(s) on the build host (`ddi-bundle keygen --out PREFIX`
# writes PREFIX.key and PREFIX.pub); several keys all sign (key rotation). Never
# put a secret key into a layer.
DDI_BUNDLE_KEYS ??= ""
DDI_BUNDLE_VERSION ??= "${DISTRO_VERSION}"
DDI_BUNDLE_COMPATIBLE ??= "${MACHINE}"
# 1: the gzip image signed as it is; 3: chunked (delta updates), from the raw image;
# 2: chunked as agents that read only formats 1 and 2 install it.
DDI_BUNDLE_FORMAT ??= "1"
# Chunked: average chunk size in KiB (a power of two; BENCHMARKS.md has the trade-off)
# and the zstd level of each chunk; format 3: KiB of image before each chunk that its
# frame is compressed with (the device holds that much in memory).
DDI_BUNDLE_CHUNK_KIB ??= "16"
DDI_BUNDLE_ZSTD_LEVEL ??= "19"
DDI_BUNDLE_HISTORY_KIB ??= "128"

IMAGE_FSTYPES:append = " ${DDI_ARTIFACT_FSTYPE}.gz"
# A chunked bundle is cut from the raw slot image.
IMAGE_FSTYPES:append = " ${@d.getVar('DDI_ARTIFACT_FSTYPE') if d.getVar('DDI_BUNDLE_FORMAT') in ('2', '3') and d.getVar('DDI_BUNDLE_KEYS') else ''}"

DDI_BUNDLE_DEPLOYDIR = "${WORKDIR}/ddi-bundle-deploy"

do_ddi_bundle() {
    if [ -z "${DDI_BUNDLE_KEYS}" ]; then
        bbnote "DDI_BUNDLE_KEYS is empty: no signed bundle for ${IMAGE_NAME}"
        exit 0
    fi
    set --
    for key in ${DDI_BUNDLE_KEYS}; do
        if [ ! -r "$key" ]; then
            bbfatal "cannot read the bundle signing key $key (DDI_BUNDLE_KEYS)"
        fi
        set -- "$@" --key "$key"
    done
    # Through a shell variable: BitBake expands the value into the task, and a constant
    # `case` word is what shellcheck (the layer check) flags.
    format="${DDI_BUNDLE_FORMAT}"
    case "$format" in
    1)
        name="${IMAGE_LINK_NAME}.${DDI_ARTIFACT_FSTYPE}.gz"
        ;;
    2 | 3)
        name="${IMAGE_LINK_NAME}.${DDI_ARTIFACT_FSTYPE}"
        set -- "$@" --chunked --chunk-format "$format" \
            --chunk-size-kib "${DDI_BUNDLE_CHUNK_KIB}" \
            --history-kib "${DDI_BUNDLE_HISTORY_KIB}" \
            --zstd-level "${DDI_BUNDLE_ZSTD_LEVEL}"
        ;;
    *)
        bbfatal "DDI_BUNDLE_FORMAT = \"$format\": expected 1, 2 or 3"
        ;;
    esac
    image="${DEPLOY_DIR_IMAGE}/$name"
    if [ ! -e "$image" ]; then
        bbfatal "$image is missing: IMAGE_FSTYPES must contain ${name#${IMAGE_LINK_NAME}.}"
    fi
    ddi-bundle create "$@" \
        --compatible "${DDI_BUNDLE_COMPATIBLE}" \
        --version "${DDI_BUNDLE_VERSION}" \
        --image "$image" \
        --image-name "$name" \
        --output "${DDI_BUNDLE_DEPLOYDIR}/${IMAGE_NAME}.ddibundle"
    ln -sf "${IMAGE_NAME}.ddibundle" "${DDI_BUNDLE_DEPLOYDIR}/${IMAGE_LINK_NAME}.ddibundle"
}

do_ddi_bundle[doc] = "Signs the slot image into <image>.ddibundle with ddi-bundle (when DDI_BUNDLE_KEYS is set)"
SSTATETASKS += "do_ddi_bundle"
do_ddi_bundle[sstate-inputdirs] = "${DDI_BUNDLE_DEPLOYDIR}"
do_ddi_bundle[sstate-outputdirs] = "${DEPLOY_DIR_IMAGE}"
do_ddi_bundle[dirs] = "${DDI_BUNDLE_DEPLOYDIR}"
do_ddi_bundle[cleandirs] = "${DDI_BUNDLE_DEPLOYDIR}"
do_ddi_bundle[depends] += "${@'ddi-bundle-native:do_populate_sysroot' if d.getVar('DDI_BUNDLE_KEYS') else ''}"
do_ddi_bundle[vardeps] += "DDI_BUNDLE_KEYS DDI_BUNDLE_FORMAT DDI_BUNDLE_CHUNK_KIB DDI_BUNDLE_ZSTD_LEVEL DDI_BUNDLE_HISTORY_KIB"
# The keys' contents are inputs too: a new key at the same path must sign again.
do_ddi_bundle[file-checksums] += "${@' '.join('%s:True' % key for key in (d.getVar('DDI_BUNDLE_KEYS') or '').split())}"

do_ddi_bundle_setscene[doc] = "Restores the signed bundle from the shared state cache"
python do_ddi_bundle_setscene() {
    sstate_setscene(d)
}
addtask do_ddi_bundle_setscene
addtask ddi_bundle after do_image_complete before do_build
