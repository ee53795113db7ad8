def plan(ctx): return []
