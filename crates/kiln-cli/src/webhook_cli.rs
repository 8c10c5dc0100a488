//! `kiln webhook`: CreateWebhook, ListWebhooks, DeleteWebhook, ListWebhookDeliveries.

use clap::Subcommand;
use kiln_client::api::CreateWebhookRequest;
use kiln_client::{Client, ClientError};

use crate::remote::{print_json, Conn};

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Register a URL for lifecycle events; prints its id and secret (shown once).
    Create {
        url: String,
        /// An event kind to send (microvm, image, egress, adopted; repeatable); all by default.
        #[arg(long = "event")]
        events: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// List webhooks.
    #[command(visible_alias = "ls")]
    List,
    /// Delete a webhook.
    #[command(visible_alias = "rm")]
    Delete { id: String },
    /// A webhook's newest deliveries (status, attempts, the receiver's last answer).
    Deliveries { id: String },
}

pub fn run(conn: Conn, cmd: WebhookCommand) -> i32 {
    match execute(&conn, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            e.exit_code()
        }
    }
}

fn execute(conn: &Conn, cmd: WebhookCommand) -> Result<i32, ClientError> {
    let c = Client::from_env(conn.endpoint.clone(), conn.api_key.clone())?;
    match cmd {
        WebhookCommand::Create {
            url,
            events,
            description,
        } => {
            let w = c.create_webhook(&CreateWebhookRequest {
                url,
                events,
                description,
            })?;
            if conn.json() {
                print_json(&w);
            } else {
                println!("{}", w.webhook_id);
                println!("secret {}", w.secret.unwrap_or_default());
            }
        }
        WebhookCommand::List => {
            let list = c.list_webhooks()?;
            if conn.json() {
                print_json(&list);
            } else {
                println!("{:<20} {:<24} URL", "WEBHOOK", "EVENTS");
                for w in list.webhooks {
                    let events = if w.events.is_empty() {
                        "all".to_string()
                    } else {
                        w.events.join(",")
                    };
                    println!("{:<20} {:<24} {}", w.webhook_id, events, w.url);
                }
            }
        }
        WebhookCommand::Delete { id } => {
            c.delete_webhook(&id)?;
            if !conn.json() {
                println!("deleted {id}");
            }
        }
        WebhookCommand::Deliveries { id } => {
            let list = c.webhook_deliveries(&id)?;
            if conn.json() {
                print_json(&list);
            } else {
                println!(
                    "{:<22} {:>6} {:<10} {:<9} {:>8} LAST",
                    "DELIVERY", "EVENT", "KIND", "STATUS", "ATTEMPTS"
                );
                for d in list.deliveries {
                    let last = d
                        .last_error
                        .or(d.last_status_code.map(|c| format!("HTTP {c}")))
                        .unwrap_or_default();
                    println!(
                        "{:<22} {:>6} {:<10} {:<9} {:>8} {last}",
                        d.delivery_id,
                        d.event_seq,
                        d.event_kind,
                        format!("{:?}", d.status).to_lowercase(),
                        d.attempts
                    );
                }
            }
        }
    }
    Ok(0)
}
