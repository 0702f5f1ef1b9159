# Defaults shared by the meta-ddi recipes: where the slots and the U-Boot environment
# live and which slot scheme the boot script and the agent use. One place, so that
# fw_env.config, the initial environment, the boot script and the agent's config and
# sandbox always agree. Override any of them in local.conf, the distro or machine conf.

# Slots: block devices (or regular files); GPT partition labels match ddi-ab.wks.in.
DDI_SLOT_A ??= "/dev/disk/by-partlabel/root_a"
DDI_SLOT_B ??= "/dev/disk/by-partlabel/root_b"

# "bootcount" (U-Boot bootcount/bootlimit/upgrade_available) or "rauc" (BOOT_ORDER, BOOT_x_LEFT).
DDI_SCHEME ??= "bootcount"
DDI_BOOT_ATTEMPTS ??= "3"

# The boot partition (FAT) holds boot.scr and the redundant environment pair; Linux
# mounts it here so that ddi-bootctl/fw_printenv reach the same files U-Boot reads.
DDI_BOOT_MOUNT ??= "/uboot"
DDI_ENV_SIZE ??= "0x4000"
DDI_ENV_FILE_1 ??= "uboot.env"
DDI_ENV_FILE_2 ??= "uboot-redund.env"
# fw_env.config lines "DEVICE OFFSET SIZE". Defaults: the two files above. A board that
# keeps its env in a raw disk area sets e.g. "/dev/mmcblk0 0x400000" and "/dev/mmcblk0 0x420000";
# an empty DDI_ENV_LOCATION_2 means a single-copy environment (not recommended).
DDI_ENV_LOCATION_1 ??= "${DDI_BOOT_MOUNT}/${DDI_ENV_FILE_1} 0x0"
DDI_ENV_LOCATION_2 ??= "${DDI_BOOT_MOUNT}/${DDI_ENV_FILE_2} 0x0"
DDI_FW_ENV_CONFIG ??= "${sysconfdir}/fw_env.config"
# The package that installs that fw_env.config. A BSP whose u-boot recipe (u-boot-env) or
# libubootenv append already ships the board's file sets this to that package, and the
# DDI_ENV_* values to what its file says (the agent's sandbox and the initial env use them).
DDI_FW_ENV_PROVIDER ??= "ddi-fw-env"

# Where the boot script finds the kernel: the root device prefix and the slot partitions.
DDI_ROOT_DEVICE ??= "/dev/vda"
DDI_SLOT_A_PARTITION ??= "2"
DDI_SLOT_B_PARTITION ??= "3"
# Inside each slot. The example image puts an empty initramfs there if the kernel has none.
DDI_KERNEL_PATH ??= "/boot/${KERNEL_IMAGETYPE}"
DDI_INITRD_PATH ??= "/boot/initrd.img"

# Agent state (pending action, feedback outbox) must survive the switch to the other
# slot: it lives on the data partition, never in a slot.
DDI_DATA_MOUNT ??= "/data"
DDI_STATE_DIR ??= "${DDI_DATA_MOUNT}/ddi-agent"
