//! A tiny DNS responder on loopback UDP for tests whose names must resolve to chosen (often
//! forbidden) addresses: set its address as a relay's `dns_servers` or an exit listener's
//! `exit_dns_servers`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use tokio::net::UdpSocket;

/// A DNS server on loopback UDP answering A and AAAA queries from `records` (other names get an
/// empty answer).
pub async fn fake_dns(records: HashMap<&'static str, Vec<IpAddr>>) -> SocketAddr {
    fake_dns_on("127.0.0.1:0", records).await.expect("bind dns")
}

/// [`fake_dns`] on a chosen UDP address (e.g. port 53, which Emissary's resolver needs).
pub async fn fake_dns_on(addr: &str, records: HashMap<&'static str, Vec<IpAddr>>) -> std::io::Result<SocketAddr> {
    let sock = UdpSocket::bind(addr).await?;
    let local = sock.local_addr()?;
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if let Some(answer) = dns_answer(&buf[..n], &records) {
                let _ = sock.send_to(&answer, from).await;
            }
        }
    });
    Ok(local)
}

fn dns_answer(q: &[u8], records: &HashMap<&'static str, Vec<IpAddr>>) -> Option<Vec<u8>> {
    let mut i = 12;
    let mut labels = Vec::new();
    while *q.get(i)? != 0 {
        let len = usize::from(q[i]);
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let end = i + 5;
    let found: Vec<&IpAddr> = records
        .get(labels.join(".").as_str())
        .map(|ips| ips.iter().filter(|ip| (qtype == 1 && ip.is_ipv4()) || (qtype == 28 && ip.is_ipv6())).collect())
        .unwrap_or_default();
    let mut r = q.get(..end)?.to_vec();
    r[2] = 0x80 | (q[2] & 0x01); // a response; copy RD
    r[3] = 0x80; // RA, NOERROR
    r[6..8].copy_from_slice(&(found.len() as u16).to_be_bytes());
    r[8..12].fill(0);
    for ip in found {
        let (rtype, rdata): (u16, Vec<u8>) = match ip {
            IpAddr::V4(v4) => (1, v4.octets().to_vec()),
            IpAddr::V6(v6) => (28, v6.octets().to_vec()),
        };
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    Some(r)
}
