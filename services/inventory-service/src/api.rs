//! The inventory's admin HTTP API: the catalog, stock levels and restocking.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use orderflow_contracts::{Money, ProductId};
use orderflow_runtime::Problem;
use orderflow_runtime::http::{JsonBody, invalid_parameter, not_found};
use orderflow_store::Db;
use serde::Deserialize;

use crate::store;

/// The routes, on the service's database.
pub fn routes(db: Db) -> Router {
    Router::new()
        .route("/v1/products", get(list))
        .route("/v1/products/{product_id}", get(show).put(upsert))
        .route("/v1/products/{product_id}/restock", post(restock))
        .with_state(db)
}

fn product_id(raw: &str) -> Result<ProductId, Problem> {
    ProductId::parse(raw).map_err(|e| invalid_parameter("product_id", e))
}

async fn list(State(db): State<Db>) -> Result<impl IntoResponse, Problem> {
    let products = store::list_products(&db).await?;
    Ok(axum::Json(serde_json::json!({ "products": products })))
}

async fn show(State(db): State<Db>, Path(raw): Path<String>) -> Result<impl IntoResponse, Problem> {
    let id = product_id(&raw)?;
    let product = store::get_product(&db, &id)
        .await?
        .ok_or_else(|| not_found(&format!("product {id}")))?;
    Ok(axum::Json(product))
}

/// The most units one restock adds: warehouse-size deliveries, far above an order line's
/// 10 000, and far below what the stock columns hold.
pub const MAX_RESTOCK: u64 = 1_000_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Restock {
    quantity: u64,
}

async fn restock(
    State(db): State<Db>,
    Path(raw): Path<String>,
    JsonBody(body): JsonBody<Restock>,
) -> Result<impl IntoResponse, Problem> {
    let id = product_id(&raw)?;
    if !(1..=MAX_RESTOCK).contains(&body.quantity) {
        return Err(invalid_parameter(
            "quantity",
            format!("must be an integer from 1 to {MAX_RESTOCK}"),
        ));
    }
    let product = store::restock(&db, &id, body.quantity)
        .await?
        .ok_or_else(|| not_found(&format!("product {id}")))?;
    tracing::info!(product_id = %id, quantity = body.quantity, "restocked");
    Ok(axum::Json(product))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Upsert {
    name: String,
    unit_price: Money,
    #[serde(default)]
    initial_stock: u32,
}

async fn upsert(
    State(db): State<Db>,
    Path(raw): Path<String>,
    JsonBody(body): JsonBody<Upsert>,
) -> Result<impl IntoResponse, Problem> {
    let id = product_id(&raw)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(invalid_parameter("name", "must be 1 to 200 characters"));
    }
    let (product, created) = store::upsert_product(
        &db,
        &id,
        name,
        body.unit_price,
        i64::from(body.initial_stock),
    )
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(product)))
}
