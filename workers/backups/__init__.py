"""Engine-neutral backup policy: retention, expiry, inventory, stored bytes, verify."""
