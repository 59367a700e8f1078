//! Consent purpose names, shared by the processor (which records consent) and the activator
//! (which enforces it per destination), so both spell a purpose the same way.

/// The canonical name of a consent purpose: trimmed and lower case; CCPA's `data_sale_opt_out`
/// is the purpose `data_sale` (the name only: what its value means is the caller's mapping).
pub fn purpose_name(name: &str) -> String {
    let n = name.trim().to_lowercase();
    if n == "data_sale_opt_out" {
        "data_sale".into()
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lower_case_and_ccpa_maps_to_data_sale() {
        for (given, want) in [
            ("advertising", "advertising"),
            (" Advertising ", "advertising"),
            ("DATA_SALE_OPT_OUT", "data_sale"),
            ("data_sale", "data_sale"),
        ] {
            assert_eq!(purpose_name(given), want, "{given}");
        }
    }
}
