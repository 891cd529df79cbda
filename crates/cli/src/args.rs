use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  isthmus server --dev                         # a throwaway control plane
  isthmus register mysql 10.0.0.5 3306 -n onprem
  isthmus get services -A
  isthmus get workloads -n onprem -o yaml
  isthmus apply -f bookinfo.yaml
  isthmus deregister mysql 10.0.0.5 -n onprem";

#[derive(Parser, Debug)]
#[command(name = "isthmus", version, about = "A service mesh for VMs and bare-metal hosts", after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ISTHMUS_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `isthmus_control_plane=debug`.
    #[arg(long, global = true, default_value = "info", env = "ISTHMUS_LOG")]
    pub log_level: String,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the operator's commands reach the admin API: flags, else environment, else a running
/// server's record, else the config file (`isthmus server --dev` writes it), else the local
/// server's token file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Connection {
    /// Admin API URL, or several replicas' comma-separated (each tried in turn when one cannot
    /// be reached) [default: from the config file, else http://127.0.0.1:15080].
    #[arg(long, env = "ISTHMUS_SERVER")]
    pub server: Option<String>,
    /// Admin token, or @FILE to read it from FILE (e.g. @/var/lib/isthmus/admin-token)
    /// [default: that of a server of this user running at --server, else from the config
    /// file, else /var/lib/isthmus/admin-token or /var/lib/isthmus-server/admin-token (the
    /// package's server)].
    #[arg(long, env = "ISTHMUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The CLI config file [default: ~/.config/isthmus/config.json].
    #[arg(long, env = "ISTHMUS_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane: registry, admin API, registration API, metrics.
    #[command(
        after_help = "Examples:\n  isthmus server --dev\n  isthmus server --data-dir /var/lib/isthmus --registration-addr 0.0.0.0:8080"
    )]
    Server(Box<isthmus_control_plane::ServerArgs>),
    /// Add an endpoint of a host to a service, creating the (selector-less) service if needed.
    #[command(
        after_help = "Unnamed ports get names guessed from the number: 80/8080 http, 443 https, 3306 mysql, else the number.\n\nExamples:\n  isthmus register mysql 10.0.0.5 3306 -n onprem\n  isthmus register web 10.0.0.6 http:8080 grpc:9090 -n shop -s web -l version=v1"
    )]
    Register {
        service: String,
        ip: String,
        /// `PORT` or `NAME:PORT`
        #[arg(required = true)]
        ports: Vec<String>,
        #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// The endpoint's service account [default: that of the agent connected from IP in this
        /// namespace, if any (so the mesh reaches it over mTLS), else `default`].
        #[arg(short = 's', long)]
        service_account: Option<String>,
        /// Label of the endpoint, `key=value` (repeatable).
        #[arg(short, long = "labels", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Annotation, `key=value` (repeatable).
        #[arg(short, long = "annotations", value_name = "KEY=VALUE")]
        annotations: Vec<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove a host's endpoint from a service (and the service, if `register` made it and no
    /// endpoint is left).
    #[command(after_help = "Example:\n  isthmus deregister mysql 10.0.0.5 -n onprem")]
    Deregister {
        service: String,
        ip: String,
        #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
        namespace: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List or show resources: services (svc), workloads (we), groups (wg).
    #[command(
        after_help = "Examples:\n  isthmus get services -A\n  isthmus get svc mysql -n onprem -o yaml\n  isthmus get workloads -l app=reviews -n bookinfo\n  isthmus get services -A --watch"
    )]
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
        /// Label selector: `k=v,k!=v,k,!k`.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// After listing, print changes as they happen (until interrupted).
        #[arg(short, long, conflicts_with = "name")]
        watch: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Create or update resources from YAML/JSON (multi-document); all or nothing.
    #[command(
        after_help = "Examples:\n  isthmus apply -f bookinfo.yaml\n  cat entry.yaml | isthmus apply -f -"
    )]
    Apply {
        /// File to read, or `-` for standard input.
        #[arg(short, long)]
        filename: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Delete a resource.
    #[command(after_help = "Example:\n  isthmus delete service mysql -n onprem")]
    Delete {
        kind: String,
        name: String,
        #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
        namespace: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Run the host agent: the host's certificate (key kept here, renewed at half-life), the
    /// registry over discovery, the DNS proxy, health probes and auto-registration, and with
    /// --proxy the mTLS (HBONE) proxy, with --capture its interception rules. Every setting is
    /// also a variable of /etc/isthmus/agent.env (shown in [env: ...]), which `isthmus join`
    /// installs and the isthmus-agent unit reads.
    #[command(after_help = "Examples:\n  \
          # what the isthmus-agent unit runs, with agent.env from `isthmus join`\n  \
          sudo sh -c 'set -a; . /etc/isthmus/agent.env; exec isthmus agent'\n\n  \
          # the whole agent by hand: capture needs root (or NET_ADMIN) and ISTIO_SERVICE_CIDR in cluster.env\n  \
          sudo isthmus agent --ca-addr https://10.0.0.2:15012 --join-token-file ./token --proxy --capture\n\n  \
          # only the certificate (the seeds' node agent)\n  \
          isthmus agent --identity-only --ca-addr https://10.0.0.2:15012 \\\n      --join-token-file /etc/isthmus/token --cert-dir /etc/certs")]
    Agent(Box<isthmus_agent::AgentArgs>),
    /// Join tokens: what a host presents to get its first certificate.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Prepare a host for the mesh.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Install a host's files from `isthmus vm config` (a directory or its .tar.gz), or fetched
    /// from the control plane with a join token (--server, --token; its root pinned by hash),
    /// and start the agent: checks the control plane first, then the istio-proxy user, the files
    /// at the paths of docs/host-layout.md, /etc/hosts, dnsmasq, and the service. Safe to re-run.
    #[command(
        after_help = "Examples:\n  isthmus join ./mysql-vm\n  isthmus join mysql-vm.tar.gz --no-start\n  isthmus join ./mysql-vm --root /tmp/fakeroot --no-start\n  isthmus join --server 10.0.0.2:15012 --token @./token\n  isthmus join --server 10.0.0.2 --token @./token --root-hash sha256:6f1e...c0a9"
    )]
    Join(crate::join::JoinArgs),
    /// The host's interception rules (iptables), from the seeds' cluster.env and sidecar.env:
    /// print them, or remove them. The agent installs them.
    #[command(
        after_help = "Examples:\n  isthmus iptables --dry-run\n  isthmus iptables --dry-run --sidecar-env ./sidecar.env -e ISTIO_INBOUND_PORTS=3306\n  isthmus iptables --cleanup"
    )]
    Iptables {
        /// Print the iptables-restore input the agent would install (and, as comments, the
        /// `ip` commands for ISTHMUS_VIP_CIDR's loopback routes), and change nothing.
        #[arg(long, required_unless_present = "cleanup", conflicts_with = "cleanup")]
        dry_run: bool,
        /// Remove every rule and chain Isthmus installed, and the ISTHMUS_VIP_CIDR routes (safe
        /// when there are none).
        #[arg(long)]
        cleanup: bool,
        #[arg(long, default_value = "/var/lib/istio/envoy/cluster.env")]
        cluster_env: PathBuf,
        #[arg(long, default_value = "/var/lib/istio/envoy/sidecar.env")]
        sidecar_env: PathBuf,
        /// Override a variable, `NAME=VALUE` (repeatable).
        #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Act inside this network namespace (`ip netns exec`).
        #[arg(long)]
        netns: Option<String>,
    },
    /// Hosts connected to the control plane's discovery stream: identity, IP, version, health,
    /// certificate expiry and how fresh their config is (like `istioctl proxy-status`).
    #[command(
        after_help = "Config states: SYNCED (last response ACKed, nothing newer sent), NOT SENT, STALE (sent, not ACKed yet), NACKED (rejected; the detail says why).\n\nExamples:\n  isthmus status\n  isthmus status -o wide\n  isthmus status 10.0.0.9\n  isthmus status vm-1.onprem -o json"
    )]
    Status(crate::status::StatusArgs),
    /// Build the seeds' scenario on this machine in network namespaces (root): a control plane,
    /// mesh hosts serving a small bookinfo, a VM host; show the calls both ways; clean up.
    #[command(
        after_help = "Examples:\n  sudo isthmus demo\n  sudo isthmus demo --keep        # explore it, Ctrl-C removes it"
    )]
    Demo(Box<isthmus_demo::DemoArgs>),
    /// Check this member host: files, control plane, clock, certificate, agent, interception
    /// rules, DNS and a mesh connection; one line per check, non-zero exit when one fails.
    #[command(
        after_help = "Examples:\n  sudo isthmus doctor\n  sudo isthmus doctor -o json --timeout 5s"
    )]
    Doctor(crate::doctor::DoctorArgs),
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  isthmus completion bash > /etc/bash_completion.d/isthmus")]
    Completion { shell: clap_complete::Shell },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Yaml,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a join token for NAMESPACE/SERVICE-ACCOUNT; prints the token alone on stdout.
    #[command(
        after_help = "Examples:\n  isthmus token create -n onprem -s mysql --ttl 1h --uses 1 > token\n  isthmus token create -n onprem --group mysql --uses 1 > token   # join --server gets the group's files\n  isthmus token create -n onprem -s mysql -o json"
    )]
    Create {
        #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// The service account [default: the group's template's, else `default`].
        #[arg(short = 's', long)]
        service_account: Option<String>,
        /// A WorkloadGroup of the namespace: `join --server` with this token installs the
        /// group's files (its inbound ports). It must exist and agree with `-s`.
        #[arg(long)]
        group: Option<String>,
        /// How long the token is valid (e.g. 30m, 1h, 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many certificates it may obtain (default: any number until it expires).
        #[arg(long)]
        uses: Option<u32>,
        /// `text` prints the token only; `json` prints it with its id and expiry.
        #[arg(short, long, default_value = "text")]
        output: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List join tokens (ids and metadata; the tokens themselves are never stored).
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        conn: Connection,
    },
    /// Revoke a join token: it gets no more certificates.
    Revoke {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Write everything a host needs to join the mesh: cluster.env, sidecar.env, kubedns,
    /// hosts, root-cert.pem, a join token and agent.env (and with --bootstrap-certs a
    /// short-lived key.pem and cert-chain.pem), into a new directory and/or a .tar.gz.
    #[command(
        after_help = "Examples:\n  isthmus vm config -n onprem -s mysql -o ./mysql-vm --inbound-ports 3306\n  isthmus vm config -n onprem --group mysql --archive mysql-vm.tar.gz --token-ttl 2h --token-uses 1\n\nThen, on the host: isthmus join ./mysql-vm"
    )]
    Config(crate::vmconfig::VmConfigArgs),
    /// Write the seeds' "machineCerts" for a host: root-cert.pem, and with --all a short-lived
    /// key.pem and cert-chain.pem for hosts that cannot use a join token.
    #[command(
        after_help = "Example:\n  isthmus vm certs -n onprem -s mysql -o ./mysql-vm --all --lifetime 2h"
    )]
    Certs {
        #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
        namespace: String,
        #[arg(short = 's', long, default_value = isthmus_model::DEFAULT_SERVICE_ACCOUNT)]
        service_account: String,
        /// Directory to write to (created if missing).
        #[arg(short, long = "output-dir")]
        output_dir: PathBuf,
        /// Also a bootstrap key and certificate.
        #[arg(long)]
        all: bool,
        /// Lifetime of the bootstrap certificate (default: the CA's default).
        #[arg(long)]
        lifetime: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
}
