# ddi A/B boot script, scheme "rauc" (RAUC-compatible variables; see the
# interface contract).
#
# Variables: BOOT_ORDER ("A B" or "B A", or one slot after a mark-bad;
# default "A B"), BOOT_A_LEFT / BOOT_B_LEFT (attempts left, hexadecimal
# without prefix, compared as 0x${...}; default 3). Every boot picks the first
# slot in BOOT_ORDER with attempts left and decrements its counter (in hex,
# as RAUC and setexpr write it). When no slot has attempts left, both
# counters are reset to 3 and the board resets (what RAUC's contrib script
# does). One environment save per boot.
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
# Kernel command line: root=<bootctl_rootdev><partition> bootctl.slot=X rauc.slot=X.
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
ddi_left_A=3
ddi_left_B=3
if test -n "${BOOT_A_LEFT}"; then ddi_left_A=${BOOT_A_LEFT}; fi
if test -n "${BOOT_B_LEFT}"; then ddi_left_B=${BOOT_B_LEFT}; fi
ddi_order="A B"
for ddi_s in ${BOOT_ORDER}; do
  if test "${ddi_s}" = A || test "${ddi_s}" = B; then ddi_order="${BOOT_ORDER}"; fi
done
ddi_slot=none
for ddi_s in ${ddi_order}; do
  if test ${ddi_slot} = none; then
    if test "${ddi_s}" = A && itest 0x${ddi_left_A} -gt 0; then ddi_slot=A; fi
    if test "${ddi_s}" = B && itest 0x${ddi_left_B} -gt 0; then ddi_slot=B; fi
  fi
done
ddi_save=1
ddi_reset=0
if test ${ddi_slot} = none; then
  echo "DDI: no slot in BOOT_ORDER '${ddi_order}' has attempts left: resetting the counters to 3"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  ddi_reset=1
else
  if test ${ddi_slot} = A; then ddi_val=${ddi_left_A}; else ddi_val=${ddi_left_B}; fi
  # counter - 1 in hex (no setexpr); values above ff count down from ff.
  ddi_left=ff
  ddi_prev=0
  for ddi_h in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
    for ddi_l in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
      if itest 0x${ddi_h}${ddi_l} == 0x${ddi_val}; then ddi_left=${ddi_prev}; fi
      if test ${ddi_h} = 0; then ddi_prev=${ddi_l}; else ddi_prev=${ddi_h}${ddi_l}; fi
    done
  done
  setenv BOOT_${ddi_slot}_LEFT ${ddi_left}
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

if test ${ddi_reset} = 1; then reset; fi
echo "DDI-BOOT: scheme=rauc slot=${ddi_slot} partition=${ddi_part} BOOT_ORDER=${ddi_order} left=${ddi_left}"
setenv bootargs "console=${ddi_console} root=${ddi_rootdev}${ddi_part} rootwait panic=5 bootctl.slot=${ddi_slot} rauc.slot=${ddi_slot} ${bootctl_args}"
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
# the attempt is used up already; the next boot tries again or falls back
reset
