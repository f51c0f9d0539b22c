//! A moto server and a seeded AWS world (VPC, tagged subnets, a node security group, instances),
//! shared by the provider's tests and the operator's.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hawser_providers::aws::sdk::credentials::Credentials;
use hawser_providers::aws::sdk::ec2::types::{ResourceType, Tag, TagSpecification};
use hawser_providers::aws::{AwsConfig, AwsProvider};

/// A moto server, stopped when dropped.
pub struct Moto {
    child: Child,
    /// Where it listens.
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh moto server; `None` (skip) when moto is not installed, except under `CI=true`.
pub fn moto() -> Option<Moto> {
    let path = std::env::var_os("HAWSER_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server"));
    if !path.exists() {
        let msg = format!(
            "moto server not found at {} (pip install \"moto[server]\" into <repo>/.venv or set HAWSER_MOTO_SERVER)",
            path.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipping AWS provider test: {msg}");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(&path)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
    let moto = Moto { child, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}

/// The provider for cluster `prod` against `moto`.
pub async fn provider(moto: &Moto) -> AwsProvider {
    let mut config = AwsConfig::new("prod");
    config.region = Some("us-east-1".into());
    config.endpoint_url = Some(moto.url.clone());
    config.static_credentials = Some(Credentials::new("test", "test", None, None, "moto"));
    config.read_rate = 1000.0;
    config.write_rate = 1000.0;
    AwsProvider::new(config).await.unwrap()
}

/// What `seed` made.
pub struct World {
    pub vpc: String,
    pub subnets: Vec<String>,
    pub node_sg: String,
    pub instances: Vec<String>,
}

pub fn ec2_tags(tags: &[(&str, &str)]) -> Vec<Tag> {
    tags.iter().map(|(k, v)| Tag::builder().key(*k).value(*v).build()).collect()
}

/// A VPC of cluster `prod` with ELB subnets, a node security group and three instances.
pub async fn seed(p: &AwsProvider) -> World {
    let ec2 = &p.clients().ec2;
    let vpc = ec2.create_vpc().cidr_block("10.0.0.0/16").send().await.unwrap();
    let vpc = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    let mut subnets = Vec::new();
    for (cidr, zone, role) in [
        ("10.0.1.0/24", "us-east-1a", "kubernetes.io/role/elb"),
        ("10.0.2.0/24", "us-east-1b", "kubernetes.io/role/elb"),
        ("10.0.3.0/24", "us-east-1a", "kubernetes.io/role/elb"),
        ("10.0.4.0/24", "us-east-1c", "unrelated"),
    ] {
        let s = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(cidr)
            .availability_zone(zone)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Subnet)
                    .set_tags(Some(ec2_tags(&[(role, "1"), ("kubernetes.io/cluster/prod", "owned")])))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        subnets.push(s.subnet().unwrap().subnet_id().unwrap().to_owned());
    }
    let sg = ec2
        .create_security_group()
        .group_name("nodes")
        .description("nodes")
        .vpc_id(&vpc)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::SecurityGroup)
                .set_tags(Some(ec2_tags(&[("kubernetes.io/cluster/prod", "owned")])))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let node_sg = sg.group_id().unwrap().to_owned();
    let mut world = World { vpc, subnets, node_sg, instances: Vec::new() };
    for i in 0..3 {
        world.instances.push(launch(p, &world, i % 2).await);
    }
    p.clear_calls();
    world
}

/// One instance in subnet `subnet` of the world.
pub async fn launch(p: &AwsProvider, world: &World, subnet: usize) -> String {
    let ec2 = &p.clients().ec2;
    let images = ec2.describe_images().send().await.unwrap();
    let image = images.images().first().and_then(|i| i.image_id()).expect("moto ships AMIs").to_owned();
    let out = ec2
        .run_instances()
        .image_id(image)
        .min_count(1)
        .max_count(1)
        .subnet_id(&world.subnets[subnet])
        .security_group_ids(&world.node_sg)
        .send()
        .await
        .unwrap();
    out.instances()[0].instance_id().unwrap().to_owned()
}
