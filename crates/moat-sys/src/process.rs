//! clone/fork with namespace flags, close_range, personality, ioprio, sched. 
