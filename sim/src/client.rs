//! User code on simulated hosts: [`Ctx`] connects to nodes with the real
//! `rill_node::client` API, and its producers and consumers record what happens in the
//! run's [`History`].
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use rill_node::{
    client::{BatchAck, Client, ClientError, ClientOptions, Consumer, Outgoing, Producer},
    protocol::{ConsumerOptions, Produced, StartPosition},
};
use rill_storage::message::{MessageId, ProducerId, StoredMessage};

use crate::{
    clock::sim_now,
    history::{Event, History},
    net::SimNet,
};

/// The port every simulated node listens on.
pub(crate) const PORT: u16 = 7400;

/// How long [`Ctx::connect`] waits for a node to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A node's address, from inside the simulation.
pub(crate) fn node_addr(node: &str) -> SocketAddr {
    (turmoil::lookup(node), PORT).into()
}

/// What a simulated client gets: its name, its network, the mesh's client certificate,
/// and the run's history. Cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    pub(crate) name: Rc<str>,
    pub(crate) net: Rc<SimNet>,
    pub(crate) certs: Rc<PathBuf>,
    pub(crate) history: History,
}

impl Ctx {
    /// This client's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Simulated time since the start of the run.
    pub fn now(&self) -> Duration {
        sim_now()
    }

    /// Waits `d` of simulated time.
    pub async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// The run's history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Writes a line into the history (and the trace log).
    pub fn note(&self, text: impl Into<String>) {
        let text = text.into();
        tracing::info!(client = %self.name, "{text}");
        self.history.push(Event::Note { at: sim_now(), client: self.name.to_string(), text });
    }

    /// The simulated network, for code that calls [`Client::connect_with`] itself.
    pub fn net(&self) -> &SimNet {
        &self.net
    }

    /// The directory holding the mesh's CA and client certificate.
    pub fn certs_dir(&self) -> &Path {
        &self.certs
    }

    /// Connects to a node, over its crashes, partitions and latency; fails with
    /// [`ClientError::Connect`] if it does not answer within [`CONNECT_TIMEOUT`].
    pub async fn connect(&self, node: &str) -> Result<Client, ClientError> {
        self.connect_within(node, CONNECT_TIMEOUT).await
    }

    /// [`Ctx::connect`], giving up after `wait`.
    pub async fn connect_within(&self, node: &str, wait: Duration) -> Result<Client, ClientError> {
        let addr = node_addr(node);
        let options = ClientOptions::new(addr, self.certs.as_path());
        match tokio::time::timeout(wait, Client::connect_with(&*self.net, &options)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Connect { addr, reason: format!("{node} did not answer within {wait:?}") }),
        }
    }

    /// Connects to `node` and opens a recording producer session on `topic` that assigns
    /// its seqs (a new epoch; see [`Client::producer`]).
    pub async fn producer(&self, node: &str, topic: &str, name: &str) -> Result<SimProducer, ClientError> {
        let client = self.connect(node).await?;
        let producer = client.producer(topic, name.to_string()).await?;
        Ok(SimProducer { ctx: self.clone(), node: node.to_string(), client, producer })
    }

    /// Connects to `node` and opens a recording producer whose seqs the caller chooses
    /// (epoch 0; see [`Client::producer_with_seqs`]): `next_seq` then says where the node's
    /// copy ends, and a message sent again with its seq is stored once.
    pub async fn producer_with_seqs(&self, node: &str, topic: &str, name: &str) -> Result<SimProducer, ClientError> {
        let client = self.connect(node).await?;
        let producer = client.producer_with_seqs(topic, name.to_string()).await?;
        Ok(SimProducer { ctx: self.clone(), node: node.to_string(), client, producer })
    }

    /// Connects to `node` and attaches a recording consumer to `subscription` of `topic`.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// use rill_sim::{ConsumerOptions, StartPosition, SubscriptionType};
    /// # fn main() -> anyhow::Result<()> {
    /// # let mut mesh = rill_sim::Mesh::builder(1).edge("gw").region("eu").link("gw", "eu").build()?;
    /// mesh.client("worker", |ctx| async move {
    ///     let options = ConsumerOptions { kind: SubscriptionType::Shared, ..ConsumerOptions::default() };
    ///     let mut c = ctx.subscribe("eu", "acme/sensors/temp", "workers", StartPosition::Earliest, options).await?;
    ///     while let Some(m) = c.next().await? {
    ///         c.ack(m.offset);
    ///     }
    ///     Ok(())
    /// });
    /// mesh.run_for(Duration::from_secs(60))?;
    /// println!("{} deliveries", mesh.history().deliveries("worker").len());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe(
        &self,
        node: &str,
        topic: &str,
        subscription: &str,
        start: StartPosition,
        options: ConsumerOptions,
    ) -> Result<SimConsumer, ClientError> {
        let client = self.connect(node).await?;
        let consumer = client.subscribe_with(topic, subscription, start, options).await?;
        Ok(SimConsumer {
            ctx: self.clone(),
            node: node.to_string(),
            topic: topic.to_string(),
            subscription: subscription.to_string(),
            client,
            consumer,
        })
    }
}

/// A [`Producer`] that records every message sent and every outcome in the history.
/// [`SimProducer::producer`] gives the plain producer for anything else.
pub struct SimProducer {
    ctx: Ctx,
    node: String,
    client: Client,
    producer: Producer,
}

impl SimProducer {
    /// The node it writes to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The plain producer (what it does through here is not recorded).
    pub fn producer(&mut self) -> &mut Producer {
        &mut self.producer
    }

    /// The id of a message of this producer.
    fn id(&self, seq: u64) -> MessageId {
        MessageId { producer: ProducerId(Arc::from(self.producer.id())), epoch: self.producer.epoch(), seq }
    }

    fn topic(&self) -> String {
        self.producer.topic().to_string()
    }

    /// Sends a batch without waiting (see [`Producer::send`]); returns its first seq.
    pub async fn send(&mut self, batch: Vec<Outgoing>) -> Result<u64, ClientError> {
        let next = self.producer.next_seq();
        let seqs: Vec<u64> = batch.iter().zip(next..).map(|(m, assigned)| m.seq.unwrap_or(assigned)).collect();
        let result = self.producer.send(batch).await;
        let at = sim_now();
        for seq in seqs {
            let (client, node, topic, id) = (self.ctx.name.to_string(), self.node.clone(), self.topic(), self.id(seq));
            self.ctx.history.push(Event::Sent { at, client, node, topic, id });
        }
        result
    }

    fn record_ack(&self, ack: &BatchAck) {
        let at = sim_now();
        for (&seq, result) in ack.seqs.iter().zip(&ack.results) {
            let (client, node, topic) = (self.ctx.name.to_string(), self.node.clone(), self.topic());
            let (id, duplicate) = (self.id(seq), matches!(result, Produced::Duplicate(_)));
            self.ctx.history.push(Event::Acked { at, client, node, topic, id, duplicate });
        }
    }

    /// Waits for the oldest batch's acknowledgement (see [`Producer::next_ack`]).
    pub async fn next_ack(&mut self) -> Result<BatchAck, ClientError> {
        let oldest = self.producer.oldest_in_flight();
        let result = self.producer.next_ack().await;
        match &result {
            Ok(ack) => self.record_ack(ack),
            Err(ClientError::Refused { code, message }) if !code.is_retriable() => {
                let ids = oldest.map(|r| r.map(|s| self.id(s)).collect()).unwrap_or_default();
                let (client, node, topic) = (self.ctx.name.to_string(), self.node.clone(), self.topic());
                let error = format!("{code:?}: {message}");
                self.ctx.history.push(Event::Refused { at: sim_now(), client, node, topic, ids, error });
            }
            Err(_) => {}
        }
        result
    }

    /// Waits for every batch in flight (see [`Producer::flush`]).
    pub async fn flush(&mut self) -> Result<Vec<BatchAck>, ClientError> {
        let mut acks = Vec::new();
        while self.producer.in_flight() > 0 {
            acks.push(self.next_ack().await?);
        }
        Ok(acks)
    }

    /// Connects to `node` (the same or another) and resends every unacknowledged batch
    /// there with its original sequence numbers (see [`Producer::resume`]).
    pub async fn reconnect(&mut self, node: &str) -> Result<(), ClientError> {
        let client = self.ctx.connect(node).await?;
        self.producer.resume(&client).await?;
        self.client = client;
        self.node = node.to_string();
        Ok(())
    }
}

/// A [`Consumer`] that records every delivery in the history.
pub struct SimConsumer {
    ctx: Ctx,
    node: String,
    topic: String,
    subscription: String,
    client: Client,
    consumer: Consumer,
}

impl SimConsumer {
    /// The node it reads from.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The plain consumer (what it receives through here is not recorded).
    pub fn consumer(&mut self) -> &mut Consumer {
        &mut self.consumer
    }

    /// The next message (see [`Consumer::next`]).
    pub async fn next(&mut self) -> Result<Option<StoredMessage>, ClientError> {
        let next = self.consumer.next().await;
        if let Ok(Some(m)) = &next {
            self.ctx.history.push(Event::Delivered {
                at: sim_now(),
                client: self.ctx.name.to_string(),
                node: self.node.clone(),
                topic: self.topic.clone(),
                subscription: self.subscription.clone(),
                offset: m.offset,
                id: m.message.id.clone(),
                origin: m.message.origin.to_string(),
            });
        }
        next
    }

    /// Acks a delivered message (see [`Consumer::ack`]).
    pub fn ack(&mut self, offset: u64) {
        self.consumer.ack(offset);
    }

    /// Nacks a delivered message (see [`Consumer::nack`]).
    pub fn nack(&mut self, offset: u64) {
        self.consumer.nack(offset);
    }

    /// Sends pending acks and detaches (see [`Consumer::close`]).
    pub async fn close(self) -> Result<(), ClientError> {
        self.consumer.close().await
    }
}
