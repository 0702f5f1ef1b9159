# ddi A/B boot script, scheme "bootcount" (see the interface contract).
#
# Variables: bootctl_slot (A|B, default A), upgrade_available (default 0),
# bootcount (decimal, default 0), bootlimit (decimal, default 3; 0 disables
# the fallback). While upgrade_available=1 every boot increments bootcount;
# when bootcount > bootlimit the script falls back: bootctl_slot = the other
# slot, upgrade_available=0, bootcount=0. All of it in ONE environment save.
#
# Works with a stock U-Boot that keeps no environment of its own
# (CONFIG_ENV_IS_NOWHERE, no saveenv, no setexpr): the script reads and
# writes the environment itself, as a REDUNDANT pair of files on the boot
# partition in the format of fw_printenv/libubootenv:
#   uboot.env        copy 1: CRC32(LE) | flag | data   (0x4000 bytes)
#   uboot-redund.env copy 2: CRC32(LE) | flag | data   (0x4000 bytes)
# The valid copy with the higher flag (255 -> 0 wraps, tie -> copy 1) is
# current; a save writes the other copy with flag + 1 and never touches the
# current one, so a power cut during a save loses that save and nothing else.
# Every variable in the stored environment is preserved by a save.
#
# Kernel command line: root=<bootctl_rootdev><partition> bootctl.slot=A|B.
# Optional variables in the stored environment (defaults in brackets):
# bootctl_part_A [2], bootctl_part_B [3], bootctl_rootdev [/dev/vda],
# bootctl_kernel [/boot/vmlinuz], bootctl_initrd [/boot/initrd.img],
# bootctl_console [ttyS0,115200; arm: ttyAMA0,115200],
# bootctl_args [] (appended), bootctl_boot [x86: zboot ${ddi_kaddr} 0 ${ddi_raddr}
# ${filesize}; arm: booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}, so that
# a board boots without a valid environment too] = the command that boots
# the loaded kernel, e.g. for arm64: booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}
# (kernel at ${ddi_kaddr}, initrd at ${ddi_raddr}, ${filesize} = initrd size,
# ${ddi_fdt} = U-Boot's fdtcontroladdr; U-Boot's other runtime variables are
# not visible then: the running environment is the stored one).
#
# Scratch memory used: 0x6000000-0x6040000.

# ---- where we were loaded from (set by distro_bootcmd) ---------------------
ddi_dev=virtio
ddi_num=0
ddi_bpart=1
if test -n "${devtype}"; then ddi_dev=${devtype}; fi
if test -n "${devnum}"; then ddi_num=${devnum}; fi
if test -n "${distro_bootpart}"; then ddi_bpart=${distro_bootpart}; fi
ddi_kaddr=0x1000000
ddi_raddr=0x4000000
if test -n "${kernel_addr_r}"; then ddi_kaddr=${kernel_addr_r}; fi
if test -n "${ramdisk_addr_r}"; then ddi_raddr=${ramdisk_addr_r}; fi
# the control device tree, for bootctl_boot on boards that pass one (the
# running environment is replaced by the stored one below)
ddi_fdt=${fdtcontroladdr}
# U-Boot's architecture (arch=arm on arm64, x86): the defaults of the boot command and
# the console when the stored environment names none (or no copy is valid)
ddi_arch=${arch}

# ---- read both copies ------------------------------------------------------
# env import -c expects CRC32 immediately followed by the data, so the CRC of
# each copy is moved one byte up (over the flag, which is kept at 0x6030010/1).
ddi_ok1=0
ddi_ok2=0
mw.b 0x6000000 0 0x4000
mw.b 0x6010000 0 0x4000
if fatload ${ddi_dev} ${ddi_num}:${ddi_bpart} 0x6000000 uboot.env 0x4000; then
  cp.b 0x6000004 0x6030010 1
  cp.b 0x6000000 0x6030000 4
  cp.b 0x6030000 0x6000001 4
  if env import -c 0x6000001 0x3fff ddi_crc_probe; then ddi_ok1=1; fi
fi
if fatload ${ddi_dev} ${ddi_num}:${ddi_bpart} 0x6010000 uboot-redund.env 0x4000; then
  cp.b 0x6010004 0x6030011 1
  cp.b 0x6010000 0x6030000 4
  cp.b 0x6030000 0x6010001 4
  if env import -c 0x6010001 0x3fff ddi_crc_probe; then ddi_ok2=1; fi
fi
ddi_cur=0
if test ${ddi_ok1} = 1 && test ${ddi_ok2} = 1; then
  ddi_cur=1
  if itest.b *0x6030010 == 0xff && itest.b *0x6030011 == 0; then
    ddi_cur=2
  elif itest.b *0x6030011 == 0xff && itest.b *0x6030010 == 0; then
    ddi_cur=1
  elif itest.b *0x6030011 -gt *0x6030010; then
    ddi_cur=2
  fi
elif test ${ddi_ok1} = 1; then
  ddi_cur=1
elif test ${ddi_ok2} = 1; then
  ddi_cur=2
fi

# The running environment becomes exactly the stored one, so that a save
# writes back every stored variable and nothing of U-Boot's own.
if test ${ddi_cur} = 1; then
  env import -d -c 0x6000001 0x3fff
  ddi_flag=0x6030010
  ddi_target=uboot-redund.env
elif test ${ddi_cur} = 2; then
  env import -d -c 0x6010001 0x3fff
  ddi_flag=0x6030011
  ddi_target=uboot.env
else
  echo "DDI: no valid environment copy, using defaults (nothing is saved)"
fi

# ---- the scheme ------------------------------------------------------------
ddi_slot=A
if test "${bootctl_slot}" = B; then ddi_slot=B; fi
ddi_ua=0
if test "${upgrade_available}" = 1; then ddi_ua=1; fi
ddi_bc=0
if test -n "${bootcount}"; then ddi_bc=${bootcount}; fi
ddi_bl=3
if test -n "${bootlimit}"; then ddi_bl=${bootlimit}; fi
ddi_save=0

if test ${ddi_ua} = 1; then
  # bootcount + 1 in decimal (no setexpr); anything that is not 0..98
  # becomes 100, above every sensible bootlimit.
  ddi_next=100
  ddi_prev=none
  for ddi_t in 0 1 2 3 4 5 6 7 8 9; do
    for ddi_u in 0 1 2 3 4 5 6 7 8 9; do
      if test ${ddi_t} = 0; then ddi_v=${ddi_u}; else ddi_v=${ddi_t}${ddi_u}; fi
      if test "${ddi_prev}" = "${ddi_bc}"; then ddi_next=${ddi_v}; fi
      ddi_prev=${ddi_v}
    done
  done
  ddi_bc=${ddi_next}
  setenv bootcount ${ddi_bc}
  ddi_save=1
  # itest reads hex; decimal strings keep their order when read as hex.
  if test "${ddi_bl}" != 0 && itest ${ddi_bc} -gt ${ddi_bl}; then
    if test ${ddi_slot} = A; then ddi_slot=B; else ddi_slot=A; fi
    echo "DDI: bootcount ${ddi_bc} > bootlimit ${ddi_bl}: falling back to slot ${ddi_slot}"
    ddi_ua=0
    ddi_bc=0
    setenv bootctl_slot ${ddi_slot}
    setenv upgrade_available 0
    setenv bootcount 0
  fi
fi

# ---- one save: the non-current copy with flag + 1 --------------------------
if test ${ddi_save} = 1 && test ${ddi_cur} != 0; then
  ddi_nflag=00
  ddi_take=0
  for ddi_h in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
    for ddi_l in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
      if test ${ddi_take} = 1; then ddi_nflag=${ddi_h}${ddi_l}; ddi_take=2; fi
      if itest.b *${ddi_flag} == 0x${ddi_h}${ddi_l}; then ddi_take=1; fi
    done
  done
  mw.b 0x6020000 0 0x4000
  env export -c -s 0x3fff 0x6020001
  cp.b 0x6020001 0x6030000 4
  cp.b 0x6030000 0x6020000 4
  mw.b 0x6020004 ${ddi_nflag}
  if fatwrite ${ddi_dev} ${ddi_num}:${ddi_bpart} 0x6020000 ${ddi_target} 0x4000; then
    echo "DDI: saved ${ddi_target} (flag ${ddi_nflag})"
  else
    echo "DDI: saving ${ddi_target} FAILED"
  fi
fi

# ---- boot the chosen slot ----------------------------------------------------
ddi_pa=2
ddi_pb=3
ddi_rootdev=/dev/vda
ddi_kernel=/boot/vmlinuz
ddi_initrd=/boot/initrd.img
ddi_console=ttyS0,115200
# arm: the PL011 (QEMU virt, Raspberry Pi, Arm's boards); others set bootctl_console
if test "${ddi_arch}" = arm; then ddi_console=ttyAMA0,115200; fi
if test -n "${bootctl_part_A}"; then ddi_pa=${bootctl_part_A}; fi
if test -n "${bootctl_part_B}"; then ddi_pb=${bootctl_part_B}; fi
if test -n "${bootctl_rootdev}"; then ddi_rootdev=${bootctl_rootdev}; fi
if test -n "${bootctl_kernel}"; then ddi_kernel=${bootctl_kernel}; fi
if test -n "${bootctl_initrd}"; then ddi_initrd=${bootctl_initrd}; fi
if test -n "${bootctl_console}"; then ddi_console=${bootctl_console}; fi
if test ${ddi_slot} = A; then ddi_part=${ddi_pa}; else ddi_part=${ddi_pb}; fi

echo "DDI-BOOT: scheme=bootcount slot=${ddi_slot} partition=${ddi_part} upgrade_available=${ddi_ua} bootcount=${ddi_bc} bootlimit=${ddi_bl}"
setenv bootargs "console=${ddi_console} root=${ddi_rootdev}${ddi_part} rootwait panic=5 bootctl.slot=${ddi_slot} ${bootctl_args}"
if load ${ddi_dev} ${ddi_num}:${ddi_part} ${ddi_kaddr} ${ddi_kernel} && load ${ddi_dev} ${ddi_num}:${ddi_part} ${ddi_raddr} ${ddi_initrd}; then
  if test -n "${bootctl_boot}"; then
    run bootctl_boot
  elif test "${ddi_arch}" = arm; then
    booti ${ddi_kaddr} ${ddi_raddr}:${filesize} ${ddi_fdt}
  else
    zboot ${ddi_kaddr} 0 ${ddi_raddr} ${filesize}
  fi
fi
echo "DDI: slot ${ddi_slot} is not bootable"
if test ${ddi_ua} = 1; then
  # a trial boot that cannot even start counts as a failed attempt
  reset
fi
