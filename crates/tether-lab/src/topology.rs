//! The lab's names, addresses and nftables rulesets as plain text, so the whole wiring
//! can be read (and unit-tested) in one place without touching the kernel.
//!
//! Router `i` joins two /24s: the client side `10.20i.1.0/24` (client `.2`, router
//! `.1`) and the server side `10.20i.2.0/24` (router `.1`, server `.2`).

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::LabError;

/// Interface names are `{tag}-r0c` at the longest and Linux allows 15 bytes.
pub(crate) const MAX_TAG_LEN: usize = 11;

/// Names of everything one lab creates, all derived from its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Names {
    pub(crate) client: String,
    pub(crate) server: String,
    pub(crate) routers: [String; 2],
}

impl Names {
    pub(crate) fn new(tag: &str) -> Names {
        Names {
            client: format!("{tag}-c"),
            server: format!("{tag}-s"),
            routers: [format!("{tag}-r0"), format!("{tag}-r1")],
        }
    }

    /// Every namespace of the lab.
    pub(crate) fn namespaces(&self) -> [&str; 4] {
        [
            &self.client,
            &self.routers[0],
            &self.routers[1],
            &self.server,
        ]
    }
}

/// The client's interface toward router `i`.
pub(crate) fn client_if(tag: &str, i: usize) -> String {
    format!("{tag}-c{i}")
}

/// Router `i`'s interface toward the client.
pub(crate) fn router_client_if(tag: &str, i: usize) -> String {
    format!("{tag}-r{i}c")
}

/// Router `i`'s interface toward the server (the NAT's outside).
pub(crate) fn router_server_if(tag: &str, i: usize) -> String {
    format!("{tag}-r{i}s")
}

/// The server's interface toward router `i`.
pub(crate) fn server_if(tag: &str, i: usize) -> String {
    format!("{tag}-s{i}")
}

/// An address on router `i`'s client side (`side` 1) or server side (`side` 2).
pub(crate) fn addr(router: usize, side: u8, host: u8) -> Ipv4Addr {
    let net = if router == 0 { 200 } else { 201 };
    Ipv4Addr::new(10, net, side, host)
}

/// Checks that a tag can name namespaces and interfaces.
pub(crate) fn validate_tag(tag: &str) -> Result<(), LabError> {
    let reason = if tag.is_empty() {
        Some("it is empty")
    } else if tag.len() > MAX_TAG_LEN {
        Some("it is longer than 11 characters (interface names are limited to 15)")
    } else if !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Some("only ASCII letters and digits are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(LabError::InvalidTag {
            tag: tag.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The NAT timeout in whole seconds, as conntrack takes it.
pub(crate) fn timeout_secs(t: Duration) -> Result<u64, LabError> {
    if t.as_secs() == 0 || t.subsec_nanos() != 0 {
        return Err(LabError::InvalidTimeout(t));
    }
    Ok(t.as_secs())
}

/// `ip -batch` lines for the client: both links up, default route via router 0.
pub(crate) fn client_batch(tag: &str) -> String {
    let mut lines = vec!["link set lo up".to_owned()];
    for i in 0..2 {
        let dev = client_if(tag, i);
        lines.push(format!("link set {dev} up"));
        lines.push(format!("addr add {}/24 dev {dev}", addr(i, 1, 2)));
    }
    lines.push(format!("route add default via {}", addr(0, 1, 1)));
    lines.join("\n") + "\n"
}

/// `ip -batch` lines for router `i`. Router 1 reaches the service address 10.200.2.2
/// through the server's second link.
pub(crate) fn router_batch(tag: &str, i: usize) -> String {
    let inside = router_client_if(tag, i);
    let outside = router_server_if(tag, i);
    let mut lines = vec![
        "link set lo up".to_owned(),
        format!("link set {inside} up"),
        format!("link set {outside} up"),
        format!("addr add {}/24 dev {inside}", addr(i, 1, 1)),
        format!("addr add {}/24 dev {outside}", addr(i, 2, 1)),
    ];
    if i == 1 {
        lines.push(format!("route add 10.200.2.0/24 via {}", addr(1, 2, 2)));
    }
    lines.join("\n") + "\n"
}

/// `ip -batch` lines for the server. No route to the client subnets: only NATed
/// traffic (from the routers' outside addresses) can be answered.
pub(crate) fn server_batch(tag: &str) -> String {
    let mut lines = vec!["link set lo up".to_owned()];
    for i in 0..2 {
        let dev = server_if(tag, i);
        lines.push(format!("link set {dev} up"));
        lines.push(format!("addr add {}/24 dev {dev}", addr(i, 2, 2)));
    }
    lines.join("\n") + "\n"
}

/// Sysctls for every namespace: no reverse-path filtering (the client has two uplinks).
pub(crate) const HOST_SYSCTLS: [&str; 2] = [
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
];

/// Sysctls that make a router a NAT with the given idle timeout. `tcp_loose=0` stops
/// conntrack from re-adopting a mid-stream packet after the mapping expired, which
/// would let a "forgotten" connection live on.
pub(crate) fn router_sysctls(timeout_secs: u64) -> Vec<String> {
    let mut settings: Vec<String> = HOST_SYSCTLS.iter().map(|s| s.to_string()).collect();
    settings.push("net.ipv4.ip_forward=1".to_owned());
    settings.push(timeout_sysctl(timeout_secs));
    settings.push("net.netfilter.nf_conntrack_tcp_loose=0".to_owned());
    settings
}

/// The sysctl that sets how long an idle established TCP mapping lives.
pub(crate) fn timeout_sysctl(timeout_secs: u64) -> String {
    format!("net.netfilter.nf_conntrack_tcp_timeout_established={timeout_secs}")
}

/// The router's stateful firewall and masquerade. Invalid packets (a mid-stream
/// segment whose mapping is gone) are dropped silently, in `input` too: otherwise the
/// router itself would answer them with a RST and the client would learn of the loss.
pub(crate) fn router_ruleset(tag: &str, i: usize) -> String {
    let inside = router_client_if(tag, i);
    let outside = router_server_if(tag, i);
    format!(
        "table inet lab {{
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state invalid drop
    ct state established,related accept
    iifname \"{inside}\" oifname \"{outside}\" ct state new accept
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ct state invalid drop
  }}
}}
table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority 100;
    oifname \"{outside}\" masquerade
  }}
}}
"
    )
}

/// The impairment table of router `i`, dropping on ingress of both interfaces (so both
/// directions) before conntrack sees the packet. The file first creates then deletes
/// the table, so one `nft -f` transaction replaces the old setting atomically.
pub(crate) fn impairment_ruleset(tag: &str, i: usize, loss_percent: u8, blackhole: bool) -> String {
    let mut text = "table netdev impair\ndelete table netdev impair\n".to_owned();
    // IP only: ARP still passes, as it would on the first hop of a path that loses
    // packets further on. Dropping ARP too let the client's neighbour entry for its
    // router fail during a blackhole, and the next connect got EHOSTUNREACH at once
    // (an error no real path blackhole gives).
    let rule = if blackhole {
        "meta protocol { ip, ip6 } counter drop".to_owned()
    } else if loss_percent > 0 {
        format!("meta protocol {{ ip, ip6 }} numgen random mod 100 < {loss_percent} counter drop")
    } else {
        return text;
    };
    text.push_str("table netdev impair {\n");
    for (chain, dev) in [
        ("from_client", router_client_if(tag, i)),
        ("from_server", router_server_if(tag, i)),
    ] {
        text.push_str(&format!(
            "  chain {chain} {{\n    type filter hook ingress device \"{dev}\" priority -500;\n    {rule}\n  }}\n"
        ));
    }
    text.push_str("}\n");
    text
}

/// Counts the TCP entries in `conntrack -L` output (one flow per line).
pub(crate) fn count_tcp_entries(listing: &str) -> usize {
    listing
        .lines()
        .filter(|line| line.trim_start().starts_with("tcp"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_interface_name_fits_in_fifteen_bytes() {
        let tag = "a".repeat(MAX_TAG_LEN);
        validate_tag(&tag).unwrap();
        for i in 0..2 {
            for name in [
                client_if(&tag, i),
                router_client_if(&tag, i),
                router_server_if(&tag, i),
                server_if(&tag, i),
            ] {
                assert!(name.len() <= 15, "{name}");
            }
        }
        assert!(validate_tag(&"a".repeat(MAX_TAG_LEN + 1)).is_err());
    }

    #[test]
    fn tags_with_separators_or_nothing_are_rejected() {
        for tag in ["", "a-b", "a b", "ü", "a/b"] {
            assert!(validate_tag(tag).is_err(), "{tag:?}");
        }
    }

    #[test]
    fn timeouts_must_be_whole_seconds_of_at_least_one() {
        assert_eq!(timeout_secs(Duration::from_secs(25)).unwrap(), 25);
        assert!(timeout_secs(Duration::ZERO).is_err());
        assert!(timeout_secs(Duration::from_millis(1500)).is_err());
    }

    #[test]
    fn router_one_reaches_the_service_address_through_the_second_link() {
        let batch = router_batch("t", 1);
        assert!(
            batch.contains("route add 10.200.2.0/24 via 10.201.2.2"),
            "{batch}"
        );
        assert!(!router_batch("t", 0).contains("route"));
    }

    #[test]
    fn server_has_no_route_to_client_subnets() {
        assert!(!server_batch("t").contains("route"));
    }

    #[test]
    fn impairment_drops_on_both_interfaces() {
        let text = impairment_ruleset("t", 0, 20, false);
        assert!(text.contains("device \"t-r0c\"") && text.contains("device \"t-r0s\""));
        assert_eq!(text.matches("numgen random mod 100 < 20").count(), 2);
        let blackhole = impairment_ruleset("t", 0, 20, true);
        assert!(!blackhole.contains("numgen") && blackhole.matches("counter drop").count() == 2);
        let off = impairment_ruleset("t", 0, 0, false);
        assert_eq!(off, "table netdev impair\ndelete table netdev impair\n");
    }

    #[test]
    fn conntrack_listing_counts_tcp_lines_only() {
        let listing = "tcp      6 9 ESTABLISHED src=10.200.1.2 dst=10.200.2.2 sport=1 dport=7000\n\
                       udp      17 29 src=10.200.1.2 dst=10.200.2.2 sport=1 dport=7000\n";
        assert_eq!(count_tcp_entries(listing), 1);
        assert_eq!(count_tcp_entries(""), 0);
    }
}
