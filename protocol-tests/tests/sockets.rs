//! Options of the server's own sockets, read from the server process (Linux: pidfd_getfd).

use std::time::{Duration, Instant};

use protocol_tests::*;

/// The inode of the server-side socket of the TCP connection from local port `client_port` to
/// `server_port`, from /proc/net/tcp (addresses there are hex, ports in host order).
fn accepted_socket_inode(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        (port(f.get(1)?)? == server_port && port(f.get(2)?)? == client_port)
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}

/// The server's descriptor for the socket with this inode.
fn fd_of_inode(pid: u32, inode: u64) -> Option<i32> {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

/// TCP_NODELAY of descriptor `fd` in process `pid`, read through a duplicate of it.
#[allow(unsafe_code)] // sound: see the SAFETY comment inside
fn tcp_nodelay_of(pid: u32, fd: i32) -> bool {
    // SAFETY: plain syscalls on descriptors this function opens and closes; the out-parameter
    // points to a live, correctly sized c_int.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) as libc::c_int;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as libc::c_int;
        assert!(dup >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let rc = libc::getsockopt(
            dup,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &mut on as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        );
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        libc::close(dup);
        libc::close(pidfd);
        on != 0
    }
}

/// Every accepted socket has Nagle's algorithm off: with it on, a socket's next small frame
/// waits for the ACK of the previous one, which the client may delay by up to 40 ms (this was
/// most of the one-topic fan-out's p99, BENCHMARKS.md).
#[tokio::test]
async fn accepted_sockets_send_small_frames_without_delay() {
    let server = Server::start().await;
    let client = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let client_port = client.local_addr().unwrap().port();
    // The accept happens on the server's own time: look until the socket is there.
    let deadline = Instant::now() + WAIT;
    let fd = loop {
        let found = accepted_socket_inode(server.port, client_port)
            .and_then(|inode| fd_of_inode(server.pid(), inode));
        if let Some(fd) = found {
            break fd;
        }
        assert!(Instant::now() < deadline, "the server never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        tcp_nodelay_of(server.pid(), fd),
        "TCP_NODELAY is off on the accepted socket"
    );
}
