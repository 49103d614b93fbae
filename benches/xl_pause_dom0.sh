# The dom0 half of benches/xl_pause.sh, sourced by the lab's run.sh (tests/xen-lab/run/
# lab.sh, scenario "bench") as /lab/bench.sh: it uses lab.sh's guest, probe, counter,
# log and $CC. For PV guests of 128, 256 and 512 MiB, one after the other:
#   - the original's pause for a whole coldclone backup through the live checkpoint
#     (xl_checkpoint = "live") and through `xl save -p` (xl_checkpoint = "save-pause"),
#     measured from the hypervisor's side by /lab/xl-pause-probe (the domain's
#     XEN_DOMINF_* flags polled through libxenctrl, ~0.5 ms apart: see its resolution_ms);
#   - where `lvcreate -s` spends its time: the same classic snapshot of the guest's
#     running LV with coldclone's flags (--noudevsync --autobackup n) and without, and
#     once with -vvv, each line timestamped as it arrives ($EPOCHREALTIME, no fork).
# Results: $OUT/bench/checks (key=value), table.md, the reports and probe outputs.
BENCH_SIZES=${BENCH_SIZES:-$(cat /lab/bench-sizes 2>/dev/null || echo 128 256 512)}

bench_config() {
  local m
  for m in $BENCH_SIZES; do
    cat <<EOF
[[vm]]
name = "b$m"
xl_domain = "b$m"
xl_snapshot_size = "16m"
xl_checkpoint = "live"
[[vm]]
name = "b$m-pause"
xl_domain = "b$m"
xl_snapshot_size = "16m"
xl_checkpoint = "save-pause"
EOF
  done
}

PROBE=/usr/local/bin/xl-pause-probe

# bench_backup VM DOMAIN DIR TAG: one backup of VM with the probe on DOMAIN.
bench_backup() {
  local vm=$1 dom=$2 d=$3 tag=$4 id rc
  id=$(xl domid "$dom") || return 1
  rm -f "$d/$tag.stop"
  "$PROBE" "$id" "$d/$tag.stop" > "$d/$tag.probe" 2> "$d/$tag.probe.err" &
  local ppid=$!
  for _ in $(seq 100); do grep -q '^ready=1' "$d/$tag.probe" 2>/dev/null && break; sleep 0.1; done
  "$CC" --json backup "$vm" > "$d/$tag.json" 2> "$d/$tag.stderr"; rc=$?
  touch "$d/$tag.stop"; wait $ppid
  local f=$d/checks
  echo "${tag}_rc=$rc" >> "$f"
  echo "${tag}_probe_pause_ms=$(awk -F= '$1=="pause_ms"{print $2}' "$d/$tag.probe")" >> "$f"
  echo "${tag}_probe_resolution_ms=$(awk -F= '$1=="resolution_ms"{print $2}' "$d/$tag.probe")" >> "$f"
  echo "${tag}_probe_windows=$(awk -F= '$1=="windows"{print $2}' "$d/$tag.probe")" >> "$f"
  echo "${tag}_probe_open_at_end=$(awk -F= '$1=="open_at_end"{print $2}' "$d/$tag.probe")" >> "$f"
  local r; r=$(head -1 "$d/$tag.json")
  echo "${tag}_method=$(echo "$r" | grep -o '"checkpoint_method":"[^"]*"' | cut -d'"' -f4)" >> "$f"
  echo "${tag}_cc_pause_ms=$(echo "$r" | grep -o '"original_pause_ms":[0-9.]*' | cut -d: -f2)" >> "$f"
  echo "${tag}_memory_ms=$(echo "$r" | grep -o '"memory_ms":[0-9.]*' | head -1 | cut -d: -f2)" >> "$f"
  echo "${tag}_disk_snapshot_ms=$(echo "$r" | grep -o '"disk_snapshot_ms":[0-9.]*' | head -1 | cut -d: -f2)" >> "$f"
  echo "${tag}_image_bytes=$(echo "$r" | grep -o '"memory_image_bytes":[0-9]*' | cut -d: -f2)" >> "$f"
  echo "${tag}_consistency=$(echo "$r" | grep -o '"consistency":"[^"]*"' | cut -d'"' -f4)" >> "$f"
  echo "${tag}_state_after=$(xl list "$dom" | awk 'NR==2{print $5}')" >> "$f"
}

# bench_lvcreate LV DIR TAG ARGS...: wall time of one classic snapshot of vg0/LV with
# ARGS, then its removal (not timed).
bench_lvcreate() {
  local lv=$1 d=$2 tag=$3 t0 t1; shift 3
  t0=$EPOCHREALTIME
  lvcreate --yes --quiet "$@" -s -L 16m -n "$lv-bench" "vg0/$lv" > /dev/null 2>> "$d/lvcreate.err"
  local rc=$?
  t1=$EPOCHREALTIME
  lvremove --yes --quiet -f "vg0/$lv-bench" > /dev/null 2>> "$d/lvcreate.err"
  echo "$tag rc=$rc ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", (b-a)*1000}')" >> "$d/lvcreate.txt"
}

# One -vvv run, every line with the time it arrived (ms since the start).
bench_lvcreate_trace() {
  local lv=$1 d=$2 tag=$3 t0 line; shift 3
  t0=$EPOCHREALTIME
  # Stamped by bash itself (no fork per line), converted to ms after.
  lvcreate -vvv --yes "$@" -s -L 16m -n "$lv-bench" "vg0/$lv" 2>&1 >/dev/null | while IFS= read -r line; do
    printf '%s %s\n' "$EPOCHREALTIME" "$line"
  done | awk -v a="$t0" '{t=$1; $1=""; printf "%7.1f%s\n", (t-a)*1000, $0}' > "$d/lvcreate-trace-$tag.txt"
  lvremove --yes --quiet -f "vg0/$lv-bench" > /dev/null 2>> "$d/lvcreate.err"
}

bench_main() {
  local d=$1 m f=$1/checks
  mkdir -p "$d"
  # The probe, from dom0's own disk and checked, like coldclone (lab.sh).
  cp /lab/xl-pause-probe "$PROBE" && chmod +x "$PROBE"
  if [ "$(sha256sum "$PROBE" | cut -d' ' -f1)" != "$(cat /lab/xl-pause-probe.sha256)" ]; then
    echo "probe_ok=0" >> "$f"; log "bench: the probe's copy is corrupted"; return 1
  fi
  echo "probe_ok=1" >> "$f"
  : > "$d/lvcreate.txt"
  for m in $BENCH_SIZES; do
    log "bench: guest b$m ($m MiB)"
    if ! guest "b$m" classic "" "$m"; then echo "b${m}_guest_rc=1" >> "$f"; continue; fi
    echo "b${m}_guest_rc=0" >> "$f"
    # Alternate the order between sizes so that neither method always runs first.
    if [ $((m / 128 % 2)) = 1 ]; then
      bench_backup "b$m" "b$m" "$d" "b${m}_live"
      bench_backup "b$m-pause" "b$m" "$d" "b${m}_pause"
    else
      bench_backup "b$m-pause" "b$m" "$d" "b${m}_pause"
      bench_backup "b$m" "b$m" "$d" "b${m}_live"
    fi
    if [ "$m" = "$(echo "$BENCH_SIZES" | awk '{print $1}')" ]; then
      local i
      for i in 1 2 3; do
        bench_lvcreate "b$m" "$d" plain
        bench_lvcreate "b$m" "$d" noudevsync --noudevsync
        bench_lvcreate "b$m" "$d" autobackup-n --autobackup n
        bench_lvcreate "b$m" "$d" coldclone --noudevsync --autobackup n
      done
      bench_lvcreate_trace "b$m" "$d" plain
      bench_lvcreate_trace "b$m" "$d" coldclone --noudevsync --autobackup n
    fi
    xl destroy "b$m"
  done
  local tag
  for tag in plain noudevsync autobackup-n coldclone; do
    echo "lvcreate_${tag}_ms=$(awk -v t="$tag" '$1==t {sub("ms=","",$3); print $3}' "$d/lvcreate.txt" | sort -n | tr '\n' ' ' | sed 's/ $//')" >> "$f"
  done
  probe "$f" lvs_left list_lvs
  probe "$f" domains_left list_domains
}
