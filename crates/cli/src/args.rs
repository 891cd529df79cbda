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

/// How the operator's commands reach the admin API: flags, else environment, else the config
/// file (`isthmus server --dev` writes it), else the local server's token file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Connection {
    /// Admin API URL [default: from the config file, else http://127.0.0.1:15080].
    #[arg(long, env = "ISTHMUS_SERVER")]
    pub server: Option<String>,
    /// Admin token [default: from the config file, else /var/lib/isthmus/admin-token].
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
        #[arg(short = 's', long, default_value = isthmus_model::DEFAULT_SERVICE_ACCOUNT)]
        service_account: String,
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
    /// Run the host agent (today: the identity manager, with --identity-only).
    #[command(
        after_help = "Example:\n  isthmus agent --identity-only --ca-addr https://10.0.0.2:15012 \\\n      --join-token-file /etc/isthmus/token --cert-dir /etc/certs"
    )]
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
    /// The host's interception rules (iptables), from the seeds' cluster.env and sidecar.env:
    /// print them, or remove them. The agent installs them.
    #[command(
        after_help = "Examples:\n  isthmus iptables --dry-run\n  isthmus iptables --dry-run --sidecar-env ./sidecar.env -e ISTIO_INBOUND_PORTS=3306\n  isthmus iptables --cleanup"
    )]
    Iptables {
        /// Print the iptables-restore input the agent would install, and change nothing.
        #[arg(long, required_unless_present = "cleanup", conflicts_with = "cleanup")]
        dry_run: bool,
        /// Remove every rule and chain Isthmus installed (safe when there are none).
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
        after_help = "Examples:\n  isthmus token create -n onprem -s mysql --ttl 1h --uses 1 > token\n  isthmus token create -n onprem -s mysql -o json"
    )]
    Create {
        #[arg(short, long, default_value = isthmus_model::DEFAULT_NAMESPACE)]
        namespace: String,
        #[arg(short = 's', long, default_value = isthmus_model::DEFAULT_SERVICE_ACCOUNT)]
        service_account: String,
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
