"""Networks: the names --model takes, building any classifier in a mode, heads, weights, timm's models."""
