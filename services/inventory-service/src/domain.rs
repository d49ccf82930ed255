//! The inventory's rules, with no IO: whether an order's lines can be reserved, all or none.

use std::collections::BTreeMap;

use orderflow_contracts::events::{OrderLine, PricedLine, RejectedLine, RejectionReason};
use orderflow_contracts::{Money, ProductId, Quantity};

/// What the store knows about one product when an order arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockLevel {
    /// The product's unit price.
    pub unit_price: Money,
    /// Units available to reserve.
    pub available: u64,
}

/// The decision for one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reserve every line (sorted by product, duplicate lines merged), charging `total`.
    Reserve {
        /// The priced lines to reserve.
        lines: Vec<PricedLine>,
        /// Their total.
        total: Money,
    },
    /// Reserve nothing: these lines fail. `reason` is the first failing line's reason.
    Reject {
        /// The overall reason.
        reason: RejectionReason,
        /// Every failing line.
        lines: Vec<RejectedLine>,
    },
}

/// Lines merged by product (two lines of one product count as one line of their sum), sorted
/// by product id — the order in which stock rows are locked, so concurrent reservations never
/// deadlock on each other.
pub fn merge_lines(lines: &[OrderLine]) -> Vec<OrderLine> {
    let mut merged: BTreeMap<&ProductId, u32> = BTreeMap::new();
    for line in lines {
        let q = merged.entry(&line.product_id).or_default();
        *q = q.saturating_add(line.quantity.get());
    }
    merged
        .into_iter()
        // Every summand is at least 1, so the sum is too; a sum beyond Quantity::MAX is
        // clamped and then fails the stock check like any quantity larger than the stock.
        .filter_map(|(product_id, q)| {
            Quantity::new(q.min(Quantity::MAX))
                .ok()
                .map(|quantity| OrderLine {
                    product_id: product_id.clone(),
                    quantity,
                })
        })
        .collect()
}

/// Decides whether `lines` can be reserved given the stock of the products involved.
pub fn decide(lines: &[OrderLine], stock: &BTreeMap<ProductId, StockLevel>) -> Decision {
    let lines = merge_lines(lines);
    let mut rejected = Vec::new();
    let mut priced = Vec::with_capacity(lines.len());
    for line in &lines {
        match stock.get(&line.product_id) {
            None => rejected.push(RejectedLine {
                product_id: line.product_id.clone(),
                requested: line.quantity,
                available: 0,
                reason: RejectionReason::UnknownProduct,
            }),
            Some(level) if level.available < u64::from(line.quantity.get()) => {
                rejected.push(RejectedLine {
                    product_id: line.product_id.clone(),
                    requested: line.quantity,
                    available: u32::try_from(level.available).unwrap_or(u32::MAX),
                    reason: RejectionReason::InsufficientStock,
                });
            }
            Some(level) => priced.push(PricedLine {
                product_id: line.product_id.clone(),
                quantity: line.quantity,
                unit_price: level.unit_price,
            }),
        }
    }
    if let Some(first) = rejected.first() {
        return Decision::Reject {
            reason: first.reason,
            lines: rejected,
        };
    }
    match total(&priced) {
        Some(total) => Decision::Reserve {
            lines: priced,
            total,
        },
        None => Decision::Reject {
            reason: RejectionReason::MixedCurrencies,
            lines: priced
                .iter()
                .map(|l| RejectedLine {
                    product_id: l.product_id.clone(),
                    requested: l.quantity,
                    available: u32::try_from(stock.get(&l.product_id).map_or(0, |s| s.available))
                        .unwrap_or(u32::MAX),
                    reason: RejectionReason::MixedCurrencies,
                })
                .collect(),
        },
    }
}

/// The total of priced lines; `None` when they mix currencies (or overflow).
fn total(lines: &[PricedLine]) -> Option<Money> {
    let first = lines.first()?;
    lines
        .iter()
        .try_fold(Money::zero(first.unit_price.currency), |sum, l| {
            l.unit_price
                .checked_mul(l.quantity)
                .and_then(|v| sum.checked_add(v))
                .ok()
        })
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    /// Stock is held for the order.
    Reserved,
    /// The order was paid: the units are sold.
    Committed,
    /// The units went back to available stock.
    Released,
    /// Nothing was reserved: the order's lines could not be.
    Rejected,
    /// The order was cancelled before any reservation; a late order-created is ignored.
    Cancelled,
}

impl ReservationStatus {
    /// The name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Reserved,
            Self::Committed,
            Self::Released,
            Self::Rejected,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// The demo catalog seeded on first start: (id, name, unit price in cents, initial stock).
pub const DEMO_CATALOG: &[(&str, &str, i64, i64)] = &[
    ("SKU-001", "Espresso beans, 1 kg", 2490, 1_000_000),
    ("SKU-002", "Ceramic mug", 1200, 1_000_000),
    ("SKU-003", "Pour-over kettle", 4990, 1_000_000),
    ("SKU-004", "Paper filters, 100 pack", 450, 1_000_000),
    ("SKU-005", "Hand grinder (limited)", 8900, 5),
];

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_contracts::Currency;

    fn line(p: &str, q: u32) -> OrderLine {
        OrderLine {
            product_id: ProductId::parse(p).unwrap(),
            quantity: Quantity::new(q).unwrap(),
        }
    }

    fn stock(entries: &[(&str, i64, &str, u64)]) -> BTreeMap<ProductId, StockLevel> {
        entries
            .iter()
            .map(|(p, price, cur, avail)| {
                (
                    ProductId::parse(*p).unwrap(),
                    StockLevel {
                        unit_price: Money::new(*price, Currency::parse(cur).unwrap()).unwrap(),
                        available: *avail,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn reserves_all_lines_with_a_total() {
        let s = stock(&[("A", 100, "EUR", 5), ("B", 250, "EUR", 1)]);
        let Decision::Reserve { lines, total } = decide(&[line("B", 1), line("A", 2)], &s) else {
            panic!("expected a reservation");
        };
        assert_eq!(
            lines
                .iter()
                .map(|l| l.product_id.as_str())
                .collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert_eq!(total.amount_minor, 450);
    }

    #[test]
    fn rejects_everything_when_one_line_fails() {
        let s = stock(&[("A", 100, "EUR", 5), ("B", 250, "EUR", 1)]);
        let d = decide(&[line("A", 1), line("B", 2), line("C", 1)], &s);
        let Decision::Reject { reason, lines } = d else {
            panic!("expected a rejection")
        };
        assert_eq!(reason, RejectionReason::InsufficientStock);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].available, 1);
        assert_eq!(lines[1].reason, RejectionReason::UnknownProduct);
    }

    #[test]
    fn merges_duplicate_lines_before_checking_stock() {
        let s = stock(&[("A", 100, "EUR", 3)]);
        assert!(matches!(
            decide(&[line("A", 2), line("A", 2)], &s),
            Decision::Reject { .. }
        ));
        let Decision::Reserve { lines, .. } = decide(&[line("A", 1), line("A", 2)], &s) else {
            panic!("expected a reservation");
        };
        assert_eq!(lines[0].quantity.get(), 3);
    }

    #[test]
    fn refuses_mixed_currencies() {
        let s = stock(&[("A", 100, "EUR", 3), ("B", 100, "USD", 3)]);
        let d = decide(&[line("A", 1), line("B", 1)], &s);
        assert!(matches!(
            d,
            Decision::Reject {
                reason: RejectionReason::MixedCurrencies,
                ..
            }
        ));
    }
}
