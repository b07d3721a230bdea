//! Gives the start-up code's pages back to the kernel once a long-running role runs. Much of its
//! resident memory is its binary's code and read-only data mapped at start-up (parsing the command
//! line and the kubeconfig, building the TLS configuration, the first connections and lists) and
//! never touched again; the kernel also maps the pages around each one touched (fault-around), so a
//! long-running process keeps most of its binary resident. After start-up, the role asks the kernel
//! to reclaim the binary's read-only mappings (`madvise(MADV_PAGEOUT)`); what it goes on using is
//! read back on its next use and stays. The agent does it once ready, the controller once its
//! caches are filled.
use std::{ffi::c_void, io, path::PathBuf, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;

/// Waits until the agent is ready (it has read IMDS and its Node), then one more poll interval (a
/// poll and the first write are done), and pages the binary out once.
pub async fn page_out_once_ready(readiness: &Readiness, poll_interval: Duration, work: &CancellationToken) {
    let ready_then_one_poll = async {
        while !readiness.is_ready() {
            tokio::time::sleep(poll_interval).await;
        }
        tokio::time::sleep(poll_interval).await;
    };
    tokio::select! {
        () = work.cancelled() => return,
        () = ready_then_one_poll => {}
    }
    page_out_and_report();
}

/// Pages the binary out now, and logs what was given back (a failure only costs memory).
pub fn page_out_and_report() {
    match page_out_binary() {
        Ok(bytes) => tracing::info!(
            mapped_kib = bytes / 1024,
            "gave the start-up code's pages back to the kernel"
        ),
        // Not fatal: the process works the same, with more resident memory.
        Err(error) => tracing::warn!(%error, "could not page out the start-up code"),
    }
}

/// One mapping of the running binary that holds no writable data: code or read-only data.
#[derive(Debug, PartialEq)]
struct ReadOnlyMapping {
    start: usize,
    end: usize,
}

/// Asks the kernel to reclaim the pages of this process's binary's read-only mappings; the bytes
/// given back to the kernel's decision (it may keep pages other processes map).
pub fn page_out_binary() -> io::Result<usize> {
    let binary = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for mapping in read_only_mappings_of(&maps, &binary) {
        let length = mapping.end - mapping.start;
        // SAFETY: the range is one whole mapping of this process, read from /proc/self/maps, of
        // the binary's file and not writable. MADV_PAGEOUT changes no contents: a paged-out page of
        // a file mapping is read back from the file on its next access.
        let result = unsafe { libc::madvise(mapping.start as *mut c_void, length, libc::MADV_PAGEOUT) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        advised += length;
    }
    Ok(advised)
}

/// The read-only mappings of `binary` in a `/proc/PID/maps` text.
fn read_only_mappings_of(maps: &str, binary: &std::path::Path) -> Vec<ReadOnlyMapping> {
    maps.lines()
        .filter_map(|line| {
            // "start-end perms offset dev inode path"
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let path = PathBuf::from(fields.nth(3)?);
            if path != binary || perms.contains('w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(ReadOnlyMapping {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn only_the_binarys_read_only_mappings_are_chosen() {
        let maps = "\
5581a000-5581b000 r--p 00000000 fd:01 42 /usr/bin/agent
5581b000-5591b000 r-xp 00001000 fd:01 42 /usr/bin/agent
5591b000-5592b000 rw-p 00101000 fd:01 42 /usr/bin/agent
7f0000000000-7f0000100000 r-xp 00000000 fd:01 7 /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
7ffd0000-7ffd1000 r--p 00000000 00:00 0 [vvar]
";
        assert_eq!(
            read_only_mappings_of(maps, Path::new("/usr/bin/agent")),
            [
                ReadOnlyMapping {
                    start: 0x5581a000,
                    end: 0x5581b000
                },
                ReadOnlyMapping {
                    start: 0x5581b000,
                    end: 0x5591b000
                },
            ]
        );
    }

    /// This process's `RssFile` from `/proc/self/status`, in KiB.
    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|line| line.starts_with("RssFile:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn the_running_binary_gives_its_code_pages_back_and_keeps_running() {
        let before = rss_file_kib();
        let advised = page_out_binary().expect("madvise on our own read-only mappings");
        let after = rss_file_kib();
        assert!(advised > 0, "the test binary has read-only mappings");
        assert!(after < before, "RssFile {before} KiB -> {after} KiB");
        // The code paged out is read back when it runs again.
        assert_eq!(read_only_mappings_of("", Path::new("/usr/bin/agent")), []);
    }
}
