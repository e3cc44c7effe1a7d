//! powerfs through the kernel: real files, syncs and renames on a mount, then a cut.
//! Needs root and /dev/fuse; `RILL_SKIP_POWERFS=1` skips it where they are missing.
use std::{fs, io::Write, os::unix::fs::FileExt, time::Duration};

use rill_powerfs::Mounted;

fn skip() -> bool {
    std::env::var_os("RILL_SKIP_POWERFS").is_some_and(|v| v == "1")
}

fn sync_dir(dir: &std::path::Path) {
    fs::File::open(dir).expect("open dir").sync_all().expect("sync dir");
}

#[test]
fn through_the_kernel_a_cut_keeps_exactly_what_was_synced() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).expect("mountpoint");
    let mut m = Mounted::mount(&mnt, Duration::ZERO)
        .unwrap_or_else(|e| panic!("mounting powerfs needs root and /dev/fuse (or RILL_SKIP_POWERFS=1): {e}"));
    fs::create_dir(mnt.join("d")).expect("mkdir");
    sync_dir(&mnt);
    let mut kept = fs::File::create(mnt.join("d/kept")).expect("create");
    kept.write_all(b"synced").expect("write");
    kept.sync_data().expect("fdatasync");
    kept.write_all_at(b" and not", 6).expect("write");
    sync_dir(&mnt.join("d"));
    fs::write(mnt.join("d/never-named"), b"x").expect("write");
    fs::File::open(mnt.join("d/never-named")).expect("open").sync_all().expect("fsync");
    fs::rename(mnt.join("d/kept"), mnt.join("d/renamed")).expect("rename");
    assert_eq!(fs::read(mnt.join("d/renamed")).expect("read"), b"synced and not");
    drop(kept);
    let report = m.cut().expect("cut");
    assert_eq!(fs::read(mnt.join("d/kept")).expect("the rename was undone"), b"synced");
    assert!(!mnt.join("d/renamed").exists() && !mnt.join("d/never-named").exists());
    assert!(report.bytes_dropped >= 8 && report.entries_undone >= 2, "{report:?}");
}
