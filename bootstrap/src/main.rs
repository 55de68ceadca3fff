//! `warren-bootstrap`: `warren up` with the always-on public profile: DHT server mode forced
//! (a bootstrap node is public by definition; waiting for AutoNAT would leave newcomers with a
//! client-mode entry point), mDNS off (a server in a data centre has no LAN peers to find), and
//! the volunteer relay on (`--relay`: advertised once AutoNAT confirms a public address, within
//! the `[relay_limits]` of the config; `--no-relay` turns it off).
//! Every other flag of `warren up` is accepted and wins over the profile.

fn main() -> std::process::ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let program = args.remove(0);
    let mut full = vec![program, "up".to_string()];
    if !args.iter().any(|a| a == "--dht-mode") {
        full.extend(["--dht-mode".to_string(), "server".to_string()]);
    }
    if !args.iter().any(|a| a == "--no-mdns") {
        full.push("--no-mdns".to_string());
    }
    let no_relay = args.iter().any(|a| a == "--no-relay");
    args.retain(|a| a != "--no-relay");
    if !no_relay && !args.iter().any(|a| a == "--relay" || a == "--relay-force") {
        full.push("--relay".to_string());
    }
    full.extend(args);
    warren_node::cli::main_with(full)
}
