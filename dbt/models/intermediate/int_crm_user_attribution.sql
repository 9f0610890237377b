-- Which internal user is credited for a CRM user id: the FIRST linked internal user (lowest link_order),
-- where a link to any id of the same person counts (alt_ids). Computed from the current links at build
-- time, so a link added later credits past opportunities too (retroactive attribution).
-- One row per (connection, crm_user_id) the warehouse knows (crm_users ids, alt ids, linked ids);
-- user_id is null when nobody is linked (the marts put those in the 'unmapped' bucket).
with

identities as (

    select * from {{ ref('int_crm_user_identities') }}

),

crm_users as (

    select * from {{ ref('stg_oppsync__crm_users') }}

),

links as (

    select * from {{ ref('stg_oppsync__user_links') }}

),

users as (

    select * from {{ ref('stg_oppsync__users') }}

),

known_ids as (

    select
        connection,
        crm_id
    from identities
    union
    select
        connection,
        crm_user_id as crm_id
    from links

),

equivalent_ids as (

    select
        connection,
        crm_id,
        crm_id as equivalent_id
    from known_ids
    union
    select
        a.connection,
        a.crm_id,
        b.crm_id as equivalent_id
    from identities as a
    inner join identities as b
        on a.connection = b.connection
        and a.person_id = b.person_id

),

ranked_links as (

    select
        e.connection,
        e.crm_id,
        l.user_id,
        l.link_order,
        row_number() over (
            partition by e.connection, e.crm_id
            order by l.link_order, l.linked_at, l.user_id
        ) as link_rank
    from equivalent_ids as e
    inner join links as l
        on e.connection = l.connection
        and e.equivalent_id = l.crm_user_id

),

first_links as (

    select * from ranked_links
    where link_rank = 1

),

crm_names as (

    select
        i.connection,
        i.crm_id,
        u.crm_user_name,
        row_number() over (
            partition by i.connection, i.crm_id
            order by case when i.is_primary_id then 0 else 1 end, i.person_id
        ) as name_rank
    from identities as i
    inner join crm_users as u
        on i.connection = u.connection
        and i.person_id = u.crm_user_id

),

final as (

    select
        k.connection,
        k.crm_id as crm_user_id,
        n.crm_user_name,
        f.user_id,
        coalesce(u.user_name, f.user_id) as user_name,
        f.link_order
    from known_ids as k
    left join first_links as f
        on k.connection = f.connection
        and k.crm_id = f.crm_id
    left join users as u
        on f.user_id = u.user_id
    left join crm_names as n
        on k.connection = n.connection
        and k.crm_id = n.crm_id
        and n.name_rank = 1

)

select * from final
