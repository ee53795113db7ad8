LABELS = {}
def plan_launch(ctx): return []
def plan_gs(ctx): return []
def plan_pool(ctx): return []
def plan_startup(ctx): return []
